"""Named executors: the `ExecutorRegistry` trait and `InMemoryExecutorRegistry`."""

from __future__ import annotations

import abc

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.executor import ModelExecutor
from ferrum_jax.interfaces.status import ExecutorMetrics


class ExecutorRegistry(abc.ABC):
    @abc.abstractmethod
    def register(self, name: str, executor: ModelExecutor) -> None:
        """Add `executor` under `name`; raise `FerrumError` if it cannot be added."""

    @abc.abstractmethod
    def get(self, name: str) -> ModelExecutor | None:
        """The executor registered as `name`, or None."""

    @abc.abstractmethod
    def remove(self, name: str) -> ModelExecutor | None:
        """Unregister `name`, returning its executor, or None if it was not registered."""

    @abc.abstractmethod
    def list_names(self) -> list[str]:
        """Registered names."""

    @abc.abstractmethod
    def get_metrics(self, name: str) -> ExecutorMetrics | None:
        """Metrics of the executor registered as `name`, or None if there is none."""


class InMemoryExecutorRegistry(ExecutorRegistry):
    """A dict-backed registry for one process."""

    def __init__(self) -> None:
        self._executors: dict[str, ModelExecutor] = {}

    def register(self, name: str, executor: ModelExecutor) -> None:
        """Raises `FerrumError.invalid_request` if `name` is taken, rather than silently
        dropping the running executor that holds it."""
        if name in self._executors:
            raise FerrumError.invalid_request(
                f"executor {name!r} is already registered; remove it first"
            )
        self._executors[name] = executor

    def get(self, name: str) -> ModelExecutor | None:
        return self._executors.get(name)

    def remove(self, name: str) -> ModelExecutor | None:
        return self._executors.pop(name, None)

    def list_names(self) -> list[str]:
        """Names in sorted order, so listings are stable."""
        return sorted(self._executors)

    def get_metrics(self, name: str) -> ExecutorMetrics | None:
        """The executor's own `metrics()` if it has one returning `ExecutorMetrics`, else
        an estimate from `status()`.

        The estimate knows counts, averages and memory but not latency distributions,
        throughput or batch fill, so p95s are NaN (unknown) and throughput and batch
        utilisation are 0.
        """
        executor = self._executors.get(name)
        if executor is None:
            return None
        metrics = getattr(executor, "metrics", None)
        if callable(metrics):
            reported = metrics()
            if isinstance(reported, ExecutorMetrics):
                return reported
        status = executor.status()
        memory = status.memory_usage
        return ExecutorMetrics(
            total_operations=status.prefill_operations + status.decode_operations,
            prefill_operations=status.prefill_operations,
            decode_operations=status.decode_operations,
            avg_prefill_latency=status.avg_prefill_time_ms,
            avg_decode_latency=status.avg_decode_time_ms,
            p95_prefill_latency=float("nan"),
            p95_decode_latency=float("nan"),
            throughput_tps=0.0,
            memory_efficiency=(
                memory.used_bytes / memory.allocated_bytes if memory.allocated_bytes else 0.0
            ),
            batch_utilization=0.0,
        )
