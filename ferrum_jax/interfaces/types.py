"""Scalar vocabulary shared by every interface: `DataType`, `Device`, `ModelInfo`.

Ports of `ferrum_types::{DataType, Device, ModelInfo}` as used by the executor seed.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.serialization import JsonSerializable


class DataType(enum.Enum):
    FP32 = "float32"
    FP16 = "float16"
    BF16 = "bfloat16"
    FP8 = "float8"
    INT8 = "int8"
    INT4 = "int4"

    def bits(self) -> int:
        return _BITS[self]

    def size_in_bytes(self) -> float:
        """Bytes per element; a float because INT4 packs two elements per byte (0.5).

        Callers sizing buffers should multiply by the element count first and round up,
        e.g. `math.ceil(n * dtype.size_in_bytes())`, or work in `bits()`.
        """
        return self.bits() / 8

    def to_jax_dtype_name(self) -> str:
        """The numpy/jax (ml_dtypes) dtype name, usable as `jnp.dtype(name)`.

        FP8 maps to e4m3fn, the variant inference weights and KV caches are stored in;
        e5m2 is a gradient format.
        """
        return _JAX_DTYPE_NAMES[self]

    @classmethod
    def from_str(cls, s: str) -> "DataType":
        """Parse a dtype name as found in configs and CLIs ("bf16", "float16", "half", ...)."""
        key = s.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        raise FerrumError.invalid_config(
            f"unknown dtype {s!r}; accepted values: {', '.join(sorted(_ALIASES))}"
        )


_BITS = {
    DataType.FP32: 32,
    DataType.FP16: 16,
    DataType.BF16: 16,
    DataType.FP8: 8,
    DataType.INT8: 8,
    DataType.INT4: 4,
}

_JAX_DTYPE_NAMES = {
    DataType.FP32: "float32",
    DataType.FP16: "float16",
    DataType.BF16: "bfloat16",
    DataType.FP8: "float8_e4m3fn",
    DataType.INT8: "int8",
    DataType.INT4: "int4",
}

_ALIASES = {
    "float32": DataType.FP32,
    "fp32": DataType.FP32,
    "f32": DataType.FP32,
    "float": DataType.FP32,
    "float16": DataType.FP16,
    "fp16": DataType.FP16,
    "f16": DataType.FP16,
    "half": DataType.FP16,
    "bfloat16": DataType.BF16,
    "bf16": DataType.BF16,
    "float8": DataType.FP8,
    "fp8": DataType.FP8,
    "f8": DataType.FP8,
    "float8_e4m3fn": DataType.FP8,
    "int8": DataType.INT8,
    "i8": DataType.INT8,
    "int4": DataType.INT4,
    "i4": DataType.INT4,
}

DEVICE_KINDS = ("cpu", "cuda", "tpu", "rocm", "metal")


@dataclasses.dataclass(frozen=True)
class Device:
    """A compute device, e.g. `Device.cuda(1)`; printed and serialised as "cuda:1"."""

    kind: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise FerrumError.invalid_config(
                f"unknown device kind {self.kind!r}; accepted kinds: {', '.join(DEVICE_KINDS)}"
            )
        if self.index < 0:
            raise FerrumError.invalid_config(
                f"device index must be >= 0, got {self.index} for {self.kind!r}"
            )

    @classmethod
    def cpu(cls) -> "Device":
        return cls("cpu", 0)

    @classmethod
    def cuda(cls, index: int = 0) -> "Device":
        return cls("cuda", index)

    @classmethod
    def tpu(cls, index: int = 0) -> "Device":
        return cls("tpu", index)

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"

    def to_json_value(self) -> str:
        return str(self)


@dataclasses.dataclass
class ModelInfo(JsonSerializable):
    """Static description of a loaded model, as reported by `ModelExecutor.info()`."""

    model_id: str
    model_type: str
    num_parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_sequence_length: int
    dtype: DataType
    device: Device
    version: str | None = None
    license: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
