"""How to build an executor: `ExecutorConfig` and its attention / memory / optimisation
sections, plus `ExecutorType`.

Every field except `model_info` has a default so a config can be written as
`ExecutorConfig(model_info=info, device=Device.tpu())`. Ranges the Rust types enforce
through unsigned integers (and the documented 0-3 optimisation level) are checked on
construction.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ferrum_jax.interfaces.capabilities import AttentionType
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.serialization import JsonSerializable
from ferrum_jax.interfaces.types import DataType, Device, ModelInfo


class ExecutorType(enum.Enum):
    # Values are the Rust variant names so `to_dict()` matches the Rust engine's JSON.
    SEQUENTIAL = "Sequential"
    BATCH = "Batch"
    CONTINUOUS_BATCH = "ContinuousBatch"
    SPECULATIVE = "Speculative"
    PIPELINE_PARALLEL = "PipelineParallel"
    TENSOR_PARALLEL = "TensorParallel"


def _require_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise FerrumError.invalid_config(f"{name} must be >= 1, got {value}")


@dataclasses.dataclass
class ExecutorAttentionConfig(JsonSerializable):
    """Runtime attention settings (not the model's architectural attention config).

    `block_size`: tokens per KV page for paged attention. `sliding_window_size`: window in
    tokens when `attention_type` is SLIDING_WINDOW.
    """

    attention_type: AttentionType = AttentionType.GROUPED_QUERY
    enable_flash_attention: bool = True
    enable_paged_attention: bool = True
    block_size: int | None = 16
    sliding_window_size: int | None = None

    def __post_init__(self) -> None:
        _require_positive("block_size", self.block_size)
        _require_positive("sliding_window_size", self.sliding_window_size)


@dataclasses.dataclass
class ExecutorMemoryConfig(JsonSerializable):
    """`memory_pool_size` in bytes (None = auto); `max_memory_usage` is the fraction of
    device memory the executor may claim, in (0, 1]."""

    enable_memory_pooling: bool = True
    memory_pool_size: int | None = None
    enable_kv_cache_sharing: bool = False
    max_memory_usage: float = 0.9

    def __post_init__(self) -> None:
        _require_positive("memory_pool_size", self.memory_pool_size)
        if not 0.0 < self.max_memory_usage <= 1.0:
            raise FerrumError.invalid_config(
                f"max_memory_usage must be in (0, 1], got {self.max_memory_usage}"
            )


@dataclasses.dataclass
class OptimizationConfig(JsonSerializable):
    """`optimization_level` 0 (none) to 3 (most aggressive); `custom_flags` are
    executor-specific switches."""

    enable_cuda_graphs: bool = False
    enable_kernel_fusion: bool = True
    enable_mixed_precision: bool = False
    optimization_level: int = 2
    custom_flags: dict[str, bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 3:
            raise FerrumError.invalid_config(
                f"optimization_level must be in 0..3, got {self.optimization_level}"
            )


@dataclasses.dataclass
class ExecutorConfig(JsonSerializable):
    """Everything a `ModelExecutorFactory` needs to build an executor.

    Defaults to CPU / float32, the combination every backend can run; set `device` and
    `dtype` (typically BF16) for an accelerator. `executor_options` holds JSON values.
    """

    model_info: ModelInfo
    device: Device = dataclasses.field(default_factory=Device.cpu)
    dtype: DataType = DataType.FP32
    max_batch_size: int = 32
    max_sequence_length: int = 2048
    attention_config: ExecutorAttentionConfig = dataclasses.field(
        default_factory=ExecutorAttentionConfig
    )
    memory_config: ExecutorMemoryConfig = dataclasses.field(default_factory=ExecutorMemoryConfig)
    optimization_config: OptimizationConfig = dataclasses.field(
        default_factory=OptimizationConfig
    )
    executor_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_positive("max_batch_size", self.max_batch_size)
        _require_positive("max_sequence_length", self.max_sequence_length)
