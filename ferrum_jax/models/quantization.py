"""Weight-only quantization of the linear layers: int8 per output channel, int4 per group.

A quantized weight keeps its parameter path and its float layout (`wq [hidden, heads,
head_dim]`), stored as integers, beside a float32 `<name>_scale`:
  int8  symmetric, scale `[out...]`: w[in, out] ~ q[in, out] * scale[out], q in [-127, 127]
        (max |w| over the inputs / 127);
  int4  affine, scale `[groups, 2, out...]` (per group a step and an offset): the inputs,
        flattened to K, fall in groups of `group_size` consecutive rows and w ~ q * step + offset,
        q in [0, 15] spanning the group's [min, max]; two values per byte along the last axis
        (element 2j in the low nibble, 2j + 1 in the high one), so its last axis is halved.
Round to nearest. int4 is affine because symmetric int4 wastes a level and centres every group
on zero: on the default model (SmolLM2-135M) symmetric groups of 128 cost +43% perplexity
(tests/test_quantization.py's text). It is packed by hand rather than stored as `jnp.int4`:
XLA:CPU lays out an int4 argument unpacked while its compiled programs expect it packed (a
layout mismatch at the first call), and a byte array is half the bytes on every backend.

The layers dequantize in the step (`linear_weight`), so XLA feeds the dot from the integer
weights: on TPU and GPU the convert and scale fuse into the matmul's operand; on CPU XLA writes
the float weights of one layer to a scratch buffer first. Tensor parallelism shards scales like
the axes they follow (`scale_spec`).

Quantized: q/k/v/o, gate/up/down and an untied lm_head. The embedding stays float (a gather,
not a matmul), and with it a tied lm_head.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ferrum_jax.interfaces.errors import FerrumError

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128

# Quantized parameters -> how many leading axes of a layer's weight are inputs.
LINEAR_INPUT_AXES = {
    "attn.wq": 1, "attn.wk": 1, "attn.wv": 1, "attn.wo": 2,
    "mlp.gate": 1, "mlp.up": 1, "mlp.down": 1, "lm_head": 1,
}  # fmt: skip
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class Quantization:
    method: str  # "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only

    def __post_init__(self):
        if self.method not in METHODS:
            raise FerrumError.invalid_config(f"quantization {self.method!r}: expected one of {list(METHODS)}")
        if self.group_size < 1:
            raise FerrumError.invalid_config(f"quantization group_size={self.group_size}: must be >= 1")

    @classmethod
    def parse(cls, value: "str | Quantization | None") -> "Quantization | None":
        return value if value is None or isinstance(value, Quantization) else cls(value)

    @property
    def packed(self) -> bool:
        return self.method == "int4"

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The integer array's shape for a float weight of `shape`."""
        return (*shape[:-1], shape[-1] // 2) if self.packed else tuple(shape)

    def groups(self, num_inputs: int) -> int | None:
        """Groups over `num_inputs` flattened input rows (None: per channel). A group size that
        does not divide the inputs halves until it does (SmolLM2's hidden 576 = 9 x 64)."""
        if self.method == "int8":
            return None
        g = self.group_size
        while num_inputs % g:
            g //= 2
        return num_inputs // g

    def scale_shape(self, shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
        groups = self.groups(math.prod(shape[:n_in]))
        return shape[n_in:] if groups is None else (groups, *shape[n_in:])


def input_axes(path: str) -> int | None:
    """Leading input axes of a quantizable parameter path (None: not quantized)."""
    return LINEAR_INPUT_AXES.get(path.removeprefix("layers."))


def quantize(w, n_in: int, q: Quantization, xp=jnp):
    """(integer weights, float32 scales) of a float weight `[in..., out...]`, int4 packed; `xp`
    is jnp (in a program) or np (on the host, one layer at a time)."""
    out_shape = w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    if not q.packed:
        scale = xp.max(xp.abs(xp.reshape(w.astype(xp.float32), (k, *out_shape))), axis=0) / 127
        scale = xp.where(scale == 0, xp.float32(1), scale).astype(xp.float32)
        return xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8), scale
    if w.shape[-1] % 2:
        raise FerrumError.invalid_config(f"int4 packs pairs along the last axis; a weight of shape {w.shape} has an odd one")
    groups = q.groups(k)
    wg = xp.reshape(w.astype(xp.float32), (groups, k // groups, *out_shape))
    low, high = xp.min(wg, axis=1), xp.max(wg, axis=1)
    step = (high - low) / 15
    step = xp.where(step == 0, xp.float32(1), step).astype(xp.float32)
    ints = xp.reshape(xp.clip(xp.round((wg - low[:, None]) / step[:, None]), 0, 15), w.shape).astype(xp.uint8)
    packed = (ints[..., 0::2] | (ints[..., 1::2] << 4)).astype(xp.uint8)
    return packed, xp.stack([step, low.astype(xp.float32)], axis=1)


def dequantize(ints: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """The float weight `[in..., out...]` in `dtype`."""
    if ints.dtype == jnp.int8:
        return ints.astype(dtype) * scale.astype(dtype)
    nibbles = jnp.stack([ints & 0xF, ints >> 4], axis=-1).reshape(*ints.shape[:-1], 2 * ints.shape[-1])
    groups = scale.shape[0]
    out_shape = nibbles.shape[n_in:]
    k = math.prod(nibbles.shape[:n_in])
    step, offset = scale[:, 0, None].astype(dtype), scale[:, 1, None].astype(dtype)
    w = nibbles.reshape(groups, k // groups, *out_shape).astype(dtype) * step + offset
    return w.reshape(nibbles.shape)


def float_shape(ints_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The float weight's shape of a stored integer weight (stacked layers too)."""
    return (*ints_shape[:-1], scale_shape[-1])


def linear_param(rngs: nnx.Rngs, shape: tuple[int, ...], n_in: int, dtype, quant: Quantization | None):
    """(weight Param, scale Param or None): a scaled-normal weight, quantized when asked."""
    w = jax.random.normal(rngs.params(), shape, jnp.float32) / math.prod(shape[:n_in]) ** 0.5
    if quant is None:
        return nnx.Param(w.astype(dtype)), None
    ints, scale = quantize(w, n_in, quant)
    return nnx.Param(ints), nnx.Param(scale)


def linear_weight(weight: nnx.Param, scale: nnx.Param | None, n_in: int, dtype) -> jax.Array:
    """The float weight a layer multiplies by (dequantized inside the step when quantized)."""
    return weight[...] if scale is None else dequantize(weight[...], scale[...], n_in, dtype)


def scale_spec(weight_spec: P, n_in: int, groups: int | None, tp: int) -> P:
    """Sharding of one layer's scale from its weight's: per channel (groups None), the output
    axes'; grouped, a groups axis first, split like the inputs (row-parallel layers split their
    inputs) when the shards hold whole groups, else replicated."""
    entries = tuple(weight_spec) + (None,) * 8
    ins, outs = entries[:n_in], tuple(weight_spec)[n_in:]
    if groups is None:
        return P(*outs)
    split = next((e for e in ins if e is not None), None)
    return P(split if groups % tp == 0 else None, None, *outs)


