"""Joining a multi-host JAX job, the first thing the server does, and the followers' loop.

`jax.distributed.initialize` must run before JAX touches a device, so `main` calls `join`
before it builds anything; importing jax (and every module of this package) is fine, as
none of them creates an array or asks for devices at import time.

With no `--coordinator-address/--num-processes/--process-id` and none of the JAX_* variables
(`ferrum_jax.distributed`), this is a single-host run and nothing happens. On a Cloud TPU
pod slice JAX reads all three from the TPU metadata, so `--num-processes` alone, or the
variables, are enough to ask for it.

In a job of several processes (every host runs the same command) the model spans every
device of every host, and the processes step in lockstep (`ferrum_jax.engine.lockstep`):
process 0 serves HTTP and runs the engine over a `LockstepExecutor`, which sends each
executor call that changes state or runs a program over the mesh to the other processes;
those build the same executor from the same flags and only replay the calls (`follow`),
with no HTTP server, until process 0 stops.
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
    if jax.process_count() > 1 and s.tensor_parallel_size != jax.device_count():
        # A mesh over some devices only would leave processes that own none of them unable
        # to place the weights, and a lockstep step runs on every process.
        raise FerrumError.invalid_config(
            f"serving across {jax.process_count()} processes shards the model over all {jax.device_count()} devices: "
            f"pass --tensor-parallel-size {jax.device_count()} (got {s.tensor_parallel_size})"
        )


def is_leader() -> bool:
    """Process 0 of a multi-process job, or a single-process run: the one serving HTTP."""
    import jax

    return jax.process_index() == 0


def is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def run_follower(s: ServeSettings) -> None:
    """A process other than 0: the leader's executor (and draft model) built from the same
    flags, replaying the leader's calls until it stops."""
    from ferrum_jax.engine.lockstep import follow
    from ferrum_jax.serve.loading import build_executor
    from ferrum_jax.serve.speculative import build_drafter

    import jax

    executor = build_executor(s)
    _, draft = build_drafter(s, executor)
    logger.info("process %d follows process 0 in lockstep", jax.process_index())
    follow(executor, draft)
