"""`RequestStream`: what `Engine.add_request` returns — an async iterator of deltas that
aborts its request when closed early (a client that went away frees its pages)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferrum_jax.engine.types import RequestOutput

if TYPE_CHECKING:
    from ferrum_jax.engine.engine import Engine
    from ferrum_jax.engine.request import Request


class RequestStream:
    def __init__(self, engine: "Engine", request: "Request"):
        self._engine = engine
        self._request = request
        self._done = False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        out = await self._request.queue.get()
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self._request.request_id)
