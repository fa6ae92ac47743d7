"""Runtime state of an executor: `ExecutorState`, `ExecutorMemoryUsage`,
`ExecutorStatus` (a snapshot from `status()`) and `ExecutorMetrics` (aggregates).

Enum values are the Rust variant names so `to_dict()` matches the Rust engine's JSON.
"""

from __future__ import annotations

import dataclasses
import enum

from ferrum_jax.interfaces.serialization import SKIP_SERIALIZATION, JsonSerializable


class ExecutorState(enum.Enum):
    INITIALIZING = "Initializing"
    READY = "Ready"
    BUSY = "Busy"
    ERROR = "Error"
    SHUTDOWN = "Shutdown"


@dataclasses.dataclass
class ExecutorMemoryUsage(JsonSerializable):
    """Device memory in bytes; `utilization_percent` is 0-100."""

    allocated_bytes: int
    used_bytes: int
    peak_bytes: int
    utilization_percent: float


@dataclasses.dataclass
class ExecutorStatus(JsonSerializable):
    """Snapshot of an executor. Times are milliseconds.

    `last_operation` is a `time.monotonic()` stamp: meaningful only inside this process,
    hence left out of `to_dict()` as the Rust `#[serde(skip)]` leaves out its `Instant`.
    """

    state: ExecutorState
    is_ready: bool
    current_batch_size: int
    prefill_operations: int
    decode_operations: int
    avg_prefill_time_ms: float
    avg_decode_time_ms: float
    memory_usage: ExecutorMemoryUsage
    last_operation: float | None = dataclasses.field(
        default=None, metadata={SKIP_SERIALIZATION: True}
    )


@dataclasses.dataclass
class ExecutorMetrics(JsonSerializable):
    """Performance aggregates. Latencies in milliseconds, throughput in tokens/s,
    `memory_efficiency` = used / allocated. NaN marks an unknown value (serialised as null)."""

    total_operations: int
    prefill_operations: int
    decode_operations: int
    avg_prefill_latency: float
    avg_decode_latency: float
    p95_prefill_latency: float
    p95_decode_latency: float
    throughput_tps: float
    memory_efficiency: float
    batch_utilization: float
