"""Multi-host start-up: `jax.distributed.initialize` before any other JAX call.

On a TPU pod slice every host runs the same command; JAX then sees every chip of the
slice, and `tensor_parallel_size` may span hosts. The coordinator address, process count
and process id come from flags or, when not given, from what JAX reads itself (the TPU
metadata server on Cloud TPU, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID).
"""

from __future__ import annotations

import os

import jax

from ferrum_jax.interfaces.errors import FerrumError

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins the multi-process JAX runtime when asked to; returns whether it did.

    Asked to: any argument given, or any of the JAX_* variables set. A single-host run
    (none of them) does nothing, so the call is safe everywhere.
    """
    given = [coordinator_address, num_processes, process_id]
    if all(v is None for v in given) and not any(os.environ.get(k) for k in _ENV):
        return False
    if num_processes is not None and num_processes < 1:
        raise FerrumError.invalid_config(f"num_processes={num_processes}: must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise FerrumError.invalid_config(f"process_id={process_id}: must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES"),
        process_id=process_id if process_id is not None else _int_env("JAX_PROCESS_ID"),
    )
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
