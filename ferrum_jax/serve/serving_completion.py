"""POST /v1/completions: prompts in any of OpenAI's four forms, `n` choices each,
streamed as SSE or returned whole.

Choice `i * n + j` is choice j of prompt i (OpenAI's ordering). `echo` prepends the
prompt text (decoded, for token-id prompts); it cannot be combined with `logprobs`,
which would need prompt logprobs the engine does not compute.
"""

from __future__ import annotations

import time

from fastapi import Request

from ferrum_jax.serve.context import ServerContext, check_common, choice_seed, new_request_id, sampling_params
from ferrum_jax.serve.errors import APIError, sse_error
from ferrum_jax.serve.generation import ChoiceSpec, Generation, GenerationResponse, run_until_disconnect
from ferrum_jax.serve.logprobs import completion_logprobs
from ferrum_jax.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptTokensDetails, UsageInfo
from ferrum_jax.serve.structured_outputs import request_spec


def _prompts(ctx: ServerContext, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each prompt."""
    p = body.prompt
    if isinstance(p, str):
        batch = [p]
    elif not p:
        raise APIError.bad_request("prompt must not be empty", param="prompt")
    elif all(isinstance(x, int) for x in p):
        batch = [list(p)]
    else:
        batch = list(p)
    out = []
    for item in batch:
        if isinstance(item, str):
            ids = ctx.tokenizer.encode(item, add_special_tokens=body.add_special_tokens)
            text = item
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < ctx.tokenizer.vocab_size]
            if bad:
                raise APIError.bad_request(f"token id {bad[0]} is outside the vocabulary [0, {ctx.tokenizer.vocab_size})", param="prompt")
            text = ctx.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else ""
        if not ids:
            raise APIError.bad_request("prompt must not be empty (it has no tokens)", param="prompt")
        out.append((text, ids))
    return out


async def create_completion(ctx: ServerContext, body: CompletionRequest, raw: Request):
    model = ctx.check_model(body.model)
    check_common(body)
    if body.suffix is not None:
        raise APIError.bad_request("suffix is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise APIError.bad_request("echo with logprobs needs prompt logprobs, which are not supported", param="echo")
    prompts = _prompts(ctx, body)
    ctx.check_choices(body.n, len(prompts))
    constraint = request_spec(body.response_format, body.structured_outputs)
    specs = []
    for i, (_, ids) in enumerate(prompts):
        ctx.check_context(len(ids), body.max_tokens, "prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else ctx.max_model_len - len(ids)
        for j in range(body.n):
            params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, seed=choice_seed(body.seed, j), renames={})
            grammar = await ctx.structured.compile(constraint)
            specs.append(ChoiceSpec(i, ids, params, ctx.choice_output(body, ids), grammar))
    request_id = new_request_id("cmpl")
    gen = Generation.submit(ctx.engine, ctx.metrics, request_id, specs, body.cache_salt)
    echo = [text if body.echo else "" for text, _ in prompts]
    if body.stream:
        return GenerationResponse(_stream(ctx, body, gen, request_id, model, echo), gen)
    return await run_until_disconnect(raw, _whole(ctx, body, gen, request_id, model, echo), gen)


def _usage(gen: Generation) -> UsageInfo:
    prompt = sum(len(ids) for ids in {c.prompt_index: c.prompt_ids for c in gen.choices}.values())
    completion = sum(c.output.num_output_tokens for c in gen.choices)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.num_cached_tokens()),
    )


async def _whole(ctx: ServerContext, body: CompletionRequest, gen: Generation, request_id: str, model: str, echo: list[str]):
    logprobs = {c.index: CompletionLogprobs() for c in gen.choices} if body.logprobs is not None else {}
    async for choice, delta in gen.events():
        if logprobs:
            completion_logprobs(delta, ctx.token_text, len(echo[choice.prompt_index]), body.return_tokens_as_token_ids, into=logprobs[choice.index])
    choices = [
        CompletionChoice(
            index=c.index,
            text=echo[c.prompt_index] + c.output.text,
            logprobs=logprobs.get(c.index),
            finish_reason=c.output.finish_reason,
            stop_reason=c.output.stop_reason,
            token_ids=c.output.token_ids if body.return_token_ids else None,
            prompt_token_ids=c.prompt_ids if body.return_token_ids else None,
        )
        for c in gen.choices
    ]
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(gen))


async def _stream(ctx: ServerContext, body: CompletionRequest, gen: Generation, request_id: str, model: str, echo: list[str]):
    created = int(time.time())

    def chunk(choice: CompletionChoice) -> str:
        return f"data: {CompletionResponse(id=request_id, created=created, model=model, choices=[choice]).model_dump_json()}\n\n"

    started = set()
    try:
        async for c, delta in gen.events():
            # One chunk per engine delta, even when its text is "" (a partial character or
            # held-back stop-string prefix), as vLLM does: clients count chunks as tokens.
            first = c.index not in started
            started.add(c.index)
            yield chunk(
                CompletionChoice(
                    index=c.index,
                    text=(echo[c.prompt_index] if first else "") + delta.text,
                    logprobs=completion_logprobs(delta, ctx.token_text, len(echo[c.prompt_index]), body.return_tokens_as_token_ids)
                    if body.logprobs is not None
                    else None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                    token_ids=delta.token_ids if body.return_token_ids else None,
                    prompt_token_ids=c.prompt_ids if body.return_token_ids and first else None,
                )
            )
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=_usage(gen))
            yield f"data: {usage.model_dump_json()}\n\n"
    except APIError as e:
        yield sse_error(e)
    finally:
        await gen.close()
    yield "data: [DONE]\n\n"
