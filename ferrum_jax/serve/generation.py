"""The engine requests behind one HTTP request, and their lifetime.

A completion with several prompts and `n` choices each is one engine request per
(prompt, choice). `Generation.submit` adds them all or none (if the engine refuses one,
the ones already added are aborted and the refusal is the reply). `events()` merges
their deltas in arrival order, already turned into text by each choice's
`ChoiceOutput`. `close()` aborts whatever has not finished; it runs when the reply is
done, when the client disconnects (`StreamingResponse` cancels the body iterator, or
`run_until_disconnect` cancels a non-streaming handler), and when a response is dropped
before its body ever started (`GenerationResponse`), so no request outlives its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from ferrum_jax.engine import RequestOutput, RequestStream, SamplingParams
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.errors import APIError
from ferrum_jax.serve.metrics import RequestTimer, ServerMetrics
from ferrum_jax.serve.output import ChoiceDelta, ChoiceOutput
from ferrum_jax.structured.matcher import RequestGrammar


@dataclasses.dataclass(eq=False)
class Choice:
    index: int  # the choice index the client sees
    prompt_index: int
    prompt_ids: list[int]
    output: ChoiceOutput
    stream: RequestStream | None = None
    timer: RequestTimer | None = None


@dataclasses.dataclass(frozen=True)
class ChoiceSpec:
    """What `submit` needs to start one choice."""

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    output: ChoiceOutput
    grammar: RequestGrammar | None = None  # structured outputs: this choice's own matcher


class Generation:
    def __init__(self, engine, metrics: ServerMetrics, choices: list[Choice]):
        self._engine = engine
        self._metrics = metrics
        self.choices = choices

    @classmethod
    def submit(
        cls, engine, metrics: ServerMetrics, request_id: str, specs: list[ChoiceSpec], cache_salt: str | None = None
    ) -> "Generation":
        arrival = time.perf_counter()
        if not engine.is_alive:
            raise APIError(503, "the engine loop is not running", type="server_error")
        gen = cls(engine, metrics, [Choice(i, s.prompt_index, s.prompt_ids, s.output) for i, s in enumerate(specs)])
        try:
            for choice, spec in zip(gen.choices, specs):
                choice.stream = engine.add_request(
                    f"{request_id}-{choice.index}", spec.prompt_ids, spec.params, cache_salt, spec.grammar
                )
                choice.timer = RequestTimer(metrics, arrival)
        except FerrumError as e:
            gen._abort_all()
            raise APIError.from_ferrum(e) from e
        return gen

    async def events(self) -> AsyncIterator[tuple[Choice, ChoiceDelta]]:
        """(choice, delta) for every non-empty delta until all choices finished. A choice
        that ends in an engine error or an abort the client did not ask for (the server
        shutting down) raises APIError; the caller closes the generation."""
        if len(self.choices) == 1:
            choice = self.choices[0]
            async for out in choice.stream:
                delta = self._apply(choice, out)
                if not delta.empty:
                    yield choice, delta
                if choice.output.finished:
                    break
        else:
            queue: asyncio.Queue = asyncio.Queue()
            pumps = [asyncio.create_task(self._pump(c, queue)) for c in self.choices]
            try:
                live = len(pumps)
                while live:
                    choice, out = await queue.get()
                    if out is None:
                        live -= 1
                        continue
                    delta = self._apply(choice, out)
                    if not delta.empty:
                        yield choice, delta
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        unfinished = [c for c in self.choices if not c.output.finished]
        if unfinished:
            raise APIError(500, "the engine ended a request without finishing it", type="server_error")

    async def close(self) -> None:
        """Aborts every choice not finished yet (idempotent); they count as finished
        with reason "abort" in the metrics."""
        for choice in self.choices:
            if choice.stream is not None:
                await choice.stream.aclose()
            if not choice.output.finished and choice.timer is not None:
                choice.output.abandon()
                choice.timer.done("abort")

    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache, once per distinct prompt (as usage counts
        prompt tokens)."""
        return sum({c.prompt_index: c.output.num_cached_tokens for c in self.choices}.values())

    def _abort_all(self) -> None:
        for choice in self.choices:
            if choice.stream is not None:
                self._engine.abort(choice.stream.request_id)

    @staticmethod
    async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
        try:
            async for out in choice.stream:
                await queue.put((choice, out))
        finally:
            queue.put_nowait((choice, None))

    def _apply(self, choice: Choice, out: RequestOutput) -> ChoiceDelta:
        was_finished = choice.output.finished
        delta = choice.output.feed(out)
        if was_finished:
            return delta
        choice.timer.tokens(len(delta.token_ids))
        if delta.finished:
            choice.timer.done(delta.finish_reason)
            if out.finish_reason == "error":
                raise APIError.from_ferrum(out.error or FerrumError.internal("engine error"))
            if out.finish_reason == "abort":
                raise APIError(503, "the request was aborted: the server is shutting down", type="server_error")
            if not out.finished:
                # A stop string ended the choice before the engine did: free its pages now.
                self._engine.abort(choice.stream.request_id)
        return delta


class GenerationResponse(StreamingResponse):
    """An SSE response that closes its generation however the response ends, including
    a client that is gone before the first byte (then the body iterator never starts and
    its own cleanup never runs)."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generation.close()


async def run_until_disconnect(request: Request, work: Awaitable, generation: Generation):
    """Awaits `work` (a non-streaming reply), cancelling it if the client disconnects
    first; the generation is closed either way. A disconnected client gets nothing
    (the 499 is for the access log: nobody reads it)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await generation.close()
