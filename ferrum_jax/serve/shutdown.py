"""Graceful shutdown: the first SIGTERM (or Ctrl-C) drains, a second one forces.

uvicorn's own handling of SIGTERM would close the listening socket, wait for open
connections, and then re-raise the signal, so the process would die *by* SIGTERM (exit
status -15) instead of exiting cleanly. `DrainingServer` instead, on the first signal:

1. marks the server draining: `/health` answers 503, so a load balancer stops sending;
2. drains the engine (`engine.drain`): new generation requests are refused with 503,
   in-flight ones run to completion for up to `--shutdown-timeout` seconds, and then
   whatever is left is aborted (its clients get an error event / a 503);
3. then tells uvicorn to exit, which closes connections once their replies are sent.

`serve()` then returns normally and the process exits 0. A second signal during the
drain falls through to uvicorn's default behaviour (immediate shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from ferrum_jax.serve.context import ServerContext

logger = logging.getLogger("ferrum_jax.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServerContext, shutdown_timeout: float):
        super().__init__(config)
        self._ctx = ctx
        self._timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs as a signal handler, between two bytecodes of whatever the loop was doing:
        # only hand the work over to the loop here.
        if sig in (signal.SIGTERM, signal.SIGINT) and not self._ctx.draining and self._loop is not None:
            self._ctx.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        stats = self._ctx.engine.stats()
        logger.info(
            "shutting down: draining %d running and %d waiting requests (up to %.0fs)",
            stats.num_running,
            stats.num_waiting,
            self._timeout,
        )
        try:
            await self._ctx.engine.drain(self._timeout)
        finally:
            self.should_exit = True
