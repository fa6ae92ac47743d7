"""POST /v1/chat/completions: the conversation rendered with the model's chat template,
then generated like a completion; streamed as `chat.completion.chunk` SSE events or
returned whole.

The template writes the special tokens itself, so the rendered text is tokenized with
`add_special_tokens=False` (as transformers and vLLM do). `tools` are passed to the
template, so a model that was trained to call them sees them; `tool_choice` decides how the
reply relates to them (`tool_calls.py`). A reply with tool calls ends with finish_reason
"tool_calls". Streamed, content is sent as it comes except what may still turn out to be a
tool call; each call is sent whole, in one `tool_calls` delta, once the reply is complete.
"""

from __future__ import annotations

import time

from fastapi import Request

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.context import ServerContext, check_common, choice_seed, new_request_id, sampling_params
from ferrum_jax.serve.errors import APIError, sse_error
from ferrum_jax.serve.generation import ChoiceSpec, Generation, GenerationResponse, run_until_disconnect
from ferrum_jax.serve.logprobs import chat_logprobs
from ferrum_jax.serve.structured_outputs import request_spec
from ferrum_jax.serve.tool_calls import ToolPlan, plan_tools
from ferrum_jax.structured.compiler import GrammarSpec
from ferrum_jax.serve.protocol import (
    DeltaToolCall,
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
    # Every message has a content for the template to read: an assistant turn that only
    # called tools has none (OpenAI allows that), and templates index `message['content']`.
    plain = [{"content": "", **m.model_dump(exclude_none=True)} for m in messages]
    try:
        text = ctx.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tools=tools, **(template_kwargs or {}))
    except FerrumError as e:
        raise APIError.from_ferrum(e, param="messages") from e
    return ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _check(body: ChatCompletionRequest) -> None:
    check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError.bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")


def _constraint(body: ChatCompletionRequest, plan: ToolPlan) -> GrammarSpec | None:
    asked = request_spec(body.response_format, body.structured_outputs)
    forced = plan.grammar(body.tools or [])
    if asked is not None and forced is not None:
        raise APIError.bad_request(
            f"tool_choice {plan.mode!r} constrains the reply itself: it cannot be combined with {asked.param.split('.')[0]}",
            param="tool_choice",
        )
    return asked or forced


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, raw: Request):
    model = ctx.check_model(body.model)
    _check(body)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, ctx.tool_call_parser is not None, ctx.tool_call_parser)
    constraint = _constraint(body, plan)
    ids = render_chat(ctx, body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs)
    ctx.check_choices(body.n, 1)
    use_max = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = getattr(body, use_max)
    ctx.check_context(len(ids), requested, "messages")
    max_tokens = requested if requested is not None else ctx.max_model_len - len(ids)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    renames = {"max_tokens": use_max, "logprobs": "top_logprobs"}
    specs = [
        ChoiceSpec(
            0, ids, sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, seed=choice_seed(body.seed, j), renames=renames),
            ctx.choice_output(body, ids), await ctx.structured.compile(constraint),
        )
        for j in range(body.n)
    ]
    request_id = new_request_id("chatcmpl")
    gen = Generation.submit(ctx.engine, ctx.metrics, request_id, specs, body.cache_salt)
    if body.stream:
        return GenerationResponse(_stream(ctx, body, plan, gen, request_id, model, ids), gen)
    return await run_until_disconnect(raw, _whole(ctx, body, plan, gen, request_id, model, ids), gen)


def _usage(gen: Generation, prompt_len: int) -> UsageInfo:
    completion = sum(c.output.num_output_tokens for c in gen.choices)
    return UsageInfo(
        prompt_tokens=prompt_len,
        completion_tokens=completion,
        total_tokens=prompt_len + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.num_cached_tokens()),
    )


def _finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


async def _whole(ctx: ServerContext, body: ChatCompletionRequest, plan: ToolPlan, gen: Generation, request_id: str, model: str, ids: list[int]):
    logprobs = {c.index: ChatChoiceLogprobs(content=[]) for c in gen.choices} if body.logprobs else {}
    async for choice, delta in gen.events():
        if logprobs:
            chat_logprobs(delta.logprobs, ctx.token_text, body.return_tokens_as_token_ids, into=logprobs[choice.index])
    choices = []
    for c in gen.choices:
        content, calls = plan.tool_calls(c.output.text)
        choices.append(
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=content, tool_calls=calls),
                logprobs=logprobs.get(c.index),
                finish_reason=_finish_reason(c.output.finish_reason, calls),
                stop_reason=c.output.stop_reason,
                token_ids=c.output.token_ids if body.return_token_ids else None,
            )
        )
    return ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=_usage(gen, len(ids)), prompt_token_ids=ids if body.return_token_ids else None
    )


async def _stream(ctx: ServerContext, body: ChatCompletionRequest, plan: ToolPlan, gen: Generation, request_id: str, model: str, ids: list[int]):
    created = int(time.time())
    texts = {c.index: "" for c in gen.choices}  # each choice's text so far
    sent = {c.index: 0 for c in gen.choices}  # how much of it went out as content

    def chunk(choices: list[ChatStreamChoice], **extra) -> str:
        c = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **extra)
        return f"data: {c.model_dump_json()}\n\n"

    try:
        # OpenAI opens every choice with a role-only delta.
        for j, c in enumerate(gen.choices):
            first = ChatStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
            yield chunk([first], prompt_token_ids=ids if body.return_token_ids and j == 0 else None)
        async for c, delta in gen.events():
            texts[c.index] += delta.text
            text, calls = texts[c.index], []
            if delta.finished:
                _, calls = plan.tool_calls(text)
                # With calls, the content is what comes before them; without, all of it.
                safe = plan.safe_content_len(text) if calls else len(text)
            else:
                safe = plan.safe_content_len(text)
            new_content, sent[c.index] = text[sent[c.index]:max(safe, sent[c.index])], max(safe, sent[c.index])
            lp = chat_logprobs(delta.logprobs, ctx.token_text, body.return_tokens_as_token_ids) if body.logprobs else None
            token_ids = delta.token_ids if body.return_token_ids else None
            # One chunk per engine delta, even when its text is "" (a partial character or
            # held-back stop-string or tool-call prefix), as vLLM does; a last delta without text is `{}`.
            if calls:
                if new_content:
                    yield chunk([ChatStreamChoice(index=c.index, delta=DeltaMessage(content=new_content), logprobs=lp, token_ids=token_ids)])
                    lp = token_ids = None
                for k, call in enumerate(calls):
                    tool_delta = DeltaToolCall(index=k, id=call.id, type="function", function=call.function)
                    yield chunk([ChatStreamChoice(index=c.index, delta=DeltaMessage(tool_calls=[tool_delta]), logprobs=lp, token_ids=token_ids)])
                    lp = token_ids = None
                new_content = None
            yield chunk(
                [
                    ChatStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=new_content if new_content or not delta.finished else None),
                        logprobs=lp,
                        finish_reason=_finish_reason(delta.finish_reason, calls),
                        stop_reason=delta.stop_reason,
                        token_ids=token_ids,
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
