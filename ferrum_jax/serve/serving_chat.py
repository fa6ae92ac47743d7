"""POST /v1/chat/completions: the conversation rendered with the model's chat template,
then generated like a completion; streamed as `chat.completion.chunk` SSE events or
returned whole.

The template writes the special tokens itself, so the rendered text is tokenized with
`add_special_tokens=False` (as transformers and vLLM do). `tools` are passed to the
template, so a model that was trained to call them sees them; the reply is returned as
text (no tool-call parsing), which is why `tool_choice` may only be "none" or "auto".
"""

from __future__ import annotations

import time

from fastapi import Request

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.context import ServerContext, check_common, choice_seed, new_request_id, sampling_params
from ferrum_jax.serve.errors import APIError, sse_error
from ferrum_jax.serve.generation import ChoiceSpec, Generation, GenerationResponse, run_until_disconnect
from ferrum_jax.serve.logprobs import chat_logprobs
from ferrum_jax.serve.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    PromptTokensDetails,
    UsageInfo,
)


def render_chat(ctx: ServerContext, messages, add_generation_prompt: bool, tools, template_kwargs: dict | None, add_special_tokens: bool = False) -> list[int]:
    """The prompt ids of a conversation (also used by /tokenize, whose `add_special_tokens`
    adds the tokenizer's own specials on top of what the template wrote, as vLLM's does)."""
    if not messages:
        raise APIError.bad_request("messages must be a non-empty list", param="messages")
    plain = [m.model_dump(exclude_none=True) for m in messages]
    try:
        text = ctx.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tools=tools, **(template_kwargs or {}))
    except FerrumError as e:
        raise APIError.from_ferrum(e, param="messages") from e
    return ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _check(body: ChatCompletionRequest) -> None:
    check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError.bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError.bad_request("tool_choice must be 'none' or 'auto': this server does not parse tool calls", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise APIError.bad_request("response_format other than {'type': 'text'} is not supported", param="response_format")


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, raw: Request):
    model = ctx.check_model(body.model)
    _check(body)
    ids = render_chat(ctx, body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs)
    ctx.check_choices(body.n, 1)
    use_max = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = getattr(body, use_max)
    ctx.check_context(len(ids), requested, "messages")
    max_tokens = requested if requested is not None else ctx.max_model_len - len(ids)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    renames = {"max_tokens": use_max, "logprobs": "top_logprobs"}
    specs = [
        ChoiceSpec(0, ids, sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, seed=choice_seed(body.seed, j), renames=renames), ctx.choice_output(body, ids))
        for j in range(body.n)
    ]
    request_id = new_request_id("chatcmpl")
    gen = Generation.submit(ctx.engine, ctx.metrics, request_id, specs, body.cache_salt)
    if body.stream:
        return GenerationResponse(_stream(ctx, body, gen, request_id, model, ids), gen)
    return await run_until_disconnect(raw, _whole(ctx, body, gen, request_id, model, ids), gen)


def _usage(gen: Generation, prompt_len: int) -> UsageInfo:
    completion = sum(c.output.num_output_tokens for c in gen.choices)
    return UsageInfo(
        prompt_tokens=prompt_len,
        completion_tokens=completion,
        total_tokens=prompt_len + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.num_cached_tokens()),
    )


async def _whole(ctx: ServerContext, body: ChatCompletionRequest, gen: Generation, request_id: str, model: str, ids: list[int]):
    logprobs = {c.index: ChatChoiceLogprobs(content=[]) for c in gen.choices} if body.logprobs else {}
    async for choice, delta in gen.events():
        if logprobs:
            chat_logprobs(delta.logprobs, ctx.token_text, body.return_tokens_as_token_ids, into=logprobs[choice.index])
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatResponseMessage(content=c.output.text),
            logprobs=logprobs.get(c.index),
            finish_reason=c.output.finish_reason,
            stop_reason=c.output.stop_reason,
            token_ids=c.output.token_ids if body.return_token_ids else None,
        )
        for c in gen.choices
    ]
    return ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=_usage(gen, len(ids)), prompt_token_ids=ids if body.return_token_ids else None
    )


async def _stream(ctx: ServerContext, body: ChatCompletionRequest, gen: Generation, request_id: str, model: str, ids: list[int]):
    created = int(time.time())

    def chunk(choices: list[ChatStreamChoice], **extra) -> str:
        c = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **extra)
        return f"data: {c.model_dump_json()}\n\n"

    try:
        # OpenAI opens every choice with a role-only delta.
        for j, c in enumerate(gen.choices):
            first = ChatStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
            yield chunk([first], prompt_token_ids=ids if body.return_token_ids and j == 0 else None)
        async for c, delta in gen.events():
            # One chunk per engine delta, even when its text is "" (a partial character or
            # held-back stop-string prefix), as vLLM does; a last delta without text is `{}`.
            yield chunk(
                [
                    ChatStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=delta.text if delta.text or not delta.finished else None),
                        logprobs=chat_logprobs(delta.logprobs, ctx.token_text, body.return_tokens_as_token_ids) if body.logprobs else None,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        token_ids=delta.token_ids if body.return_token_ids else None,
                    )
                ]
            )
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=_usage(gen, len(ids)))
    except APIError as e:
        yield sse_error(e)
    finally:
        await gen.close()
    yield "data: [DONE]\n\n"
