"""Joining a multi-host JAX job, the first thing the server does.

`jax.distributed.initialize` must run before JAX touches a device, so `main` calls `join`
before it builds anything; importing jax (and every module of this package) is fine, as
none of them creates an array or asks for devices at import time.

With no `--coordinator-address/--num-processes/--process-id` and none of the JAX_* variables
(`ferrum_jax.distributed`), this is a single-host run and nothing happens. On a Cloud TPU
pod slice JAX reads all three from the TPU metadata, so `--num-processes` alone, or the
variables, are enough to ask for it.

A job of several processes is then refused, on purpose and before any weights are read:
in JAX's multi-controller model every process must launch the same step programs in the same
order, and the engine schedules from the requests its own process received, so the process
that got a request would wait forever in the first collective for hosts that never run it.
Serving a multi-host slice needs the engine to run in lockstep (process 0 schedules and
broadcasts each step's batch; the others replay it), which it does not do yet.
"""

from __future__ import annotations

import logging

from ferrum_jax import distributed
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.settings import ServeSettings

logger = logging.getLogger("ferrum_jax.serve")


def join(s: ServeSettings) -> None:
    if not distributed.initialize(s.coordinator_address, s.num_processes, s.process_id):
        return
    import jax

    logger.info(
        "joined the JAX distributed runtime: process %d of %d, %d of %d devices local",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    if jax.process_count() > 1:
        raise FerrumError.unsupported(
            f"serving across {jax.process_count()} processes needs the engine to step in lockstep on every host, "
            "which it does not do yet; serve from one host (a single-host slice such as TPU v5e-8 or v5p-8 runs "
            "one process over all its chips), see README.md 'Multi-host / TPU pod slice'"
        )
