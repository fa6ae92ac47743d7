"""What an executor can do and how much memory it needs: `ExecutorCapabilities`,
`AttentionType`, `MemoryRequirements`.

Enum values are the Rust variant names so `to_dict()` output matches what serde_json
writes for the Rust engine's types.
"""

from __future__ import annotations

import dataclasses
import enum

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.serialization import JsonSerializable
from ferrum_jax.interfaces.types import DataType, Device


class AttentionType(enum.Enum):
    MULTI_HEAD = "MultiHead"
    MULTI_QUERY = "MultiQuery"
    GROUPED_QUERY = "GroupedQuery"
    FLASH = "Flash"
    PAGED = "Paged"
    SLIDING_WINDOW = "SlidingWindow"


@dataclasses.dataclass
class MemoryRequirements(JsonSerializable):
    """Memory estimate in bytes; `kv_cache_memory_per_token` is per token per layer."""

    parameter_memory: int
    activation_memory_per_token: int
    kv_cache_memory_per_token: int
    overhead_memory: int

    def calculate_total_memory(self, batch_size: int, sequence_length: int, num_layers: int) -> int:
        """Bytes for parameters + activations + KV cache + overhead at this workload.

        activations = activation_memory_per_token * batch * seq;
        kv = kv_cache_memory_per_token * batch * seq * layers.
        """
        for name, value in (
            ("batch_size", batch_size),
            ("sequence_length", sequence_length),
            ("num_layers", num_layers),
        ):
            if value < 0:
                raise FerrumError.invalid_request(f"{name} must be >= 0, got {value}")
        tokens = batch_size * sequence_length
        activation_mem = self.activation_memory_per_token * tokens
        kv_cache_mem = self.kv_cache_memory_per_token * tokens * num_layers
        return self.parameter_memory + activation_mem + kv_cache_mem + self.overhead_memory


@dataclasses.dataclass
class ExecutorCapabilities(JsonSerializable):
    max_batch_size: int
    max_sequence_length: int
    attention_mechanisms: list[AttentionType]
    supports_dynamic_batching: bool
    supports_continuous_batching: bool
    supports_speculative_decoding: bool
    supports_tensor_parallelism: bool
    supports_pipeline_parallelism: bool
    supported_dtypes: list[DataType]
    supported_devices: list[Device]
    memory_requirements: MemoryRequirements
