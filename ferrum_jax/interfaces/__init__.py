"""The executor interface: a Python port of ferrum's `model_executor.rs` and the
`ferrum_types` it uses. Everything public is re-exported here."""

from ferrum_jax.interfaces.capabilities import (
    AttentionType,
    ExecutorCapabilities,
    MemoryRequirements,
)
from ferrum_jax.interfaces.config import (
    ExecutorAttentionConfig,
    ExecutorConfig,
    ExecutorMemoryConfig,
    ExecutorType,
    OptimizationConfig,
)
from ferrum_jax.interfaces.errors import (
    BackendError,
    CancelledError,
    ErrorKind,
    FerrumError,
    InternalError,
    InvalidConfigError,
    InvalidRequestError,
    ModelError,
    NotFoundError,
    ResourceExhaustedError,
    TimeoutError_,
    UnsupportedError,
)
from ferrum_jax.interfaces.executor import (
    BatchModelExecutor,
    ModelExecutor,
    ModelExecutorFactory,
    SpeculativeExecutor,
)
from ferrum_jax.interfaces.inputs import (
    DecodeInput,
    DecodeOutput,
    PrefillInput,
    PrefillOutput,
    SpeculativeDecodeOutput,
    UnifiedBatch,
    UnifiedBatchItem,
)
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.interfaces.registry import ExecutorRegistry, InMemoryExecutorRegistry
from ferrum_jax.interfaces.serialization import JsonSerializable, to_json_safe
from ferrum_jax.interfaces.status import (
    ExecutorMemoryUsage,
    ExecutorMetrics,
    ExecutorState,
    ExecutorStatus,
)
from ferrum_jax.interfaces.tensor_ref import TensorRef
from ferrum_jax.interfaces.types import DEVICE_KINDS, DataType, Device, ModelInfo

__all__ = [
    "AttentionType",
    "BackendError",
    "BatchModelExecutor",
    "CancelledError",
    "DEVICE_KINDS",
    "DataType",
    "DecodeInput",
    "DecodeOutput",
    "Device",
    "ErrorKind",
    "ExecutorAttentionConfig",
    "ExecutorCapabilities",
    "ExecutorConfig",
    "ExecutorMemoryConfig",
    "ExecutorMemoryUsage",
    "ExecutorMetrics",
    "ExecutorRegistry",
    "ExecutorState",
    "ExecutorStatus",
    "ExecutorType",
    "FerrumError",
    "InMemoryExecutorRegistry",
    "InternalError",
    "InvalidConfigError",
    "InvalidRequestError",
    "JsonSerializable",
    "KvCacheHandle",
    "MemoryRequirements",
    "ModelError",
    "ModelExecutor",
    "ModelExecutorFactory",
    "ModelInfo",
    "NotFoundError",
    "OptimizationConfig",
    "PrefillInput",
    "PrefillOutput",
    "ResourceExhaustedError",
    "SpeculativeDecodeOutput",
    "SpeculativeExecutor",
    "TensorRef",
    "TimeoutError_",
    "UnifiedBatch",
    "UnifiedBatchItem",
    "UnsupportedError",
    "to_json_safe",
]
