"""Weight-only quantization of the linear layers: int8 per output channel or per group, int4 per group.

A quantized weight keeps its parameter path and its float layout (`wq [hidden, heads,
head_dim]`), stored as integers, beside a float32 `<name>_scale`:
  int8  symmetric, scale `[out...]`: w[in, out] ~ q[in, out] * scale[out], q in [-127, 127]
        (max |w| over the inputs / 127). With a group size (GGUF Q8_0's blocks of 32, which
        load as they are), one scale per group of consecutive rows of the last input axis
        and output: scale `[groups, out...]`, w ~ q * scale[group];
  int4  affine, scale `[groups, 2, out...]` (per group a step and an offset): the last input
        axis falls in groups of `group_size` consecutive rows (halved until it divides that
        axis: 64 for a 64-dim head of wo or SmolLM2's hidden 576) and w ~ q * step + offset,
        q in [0, 15] spanning the group's [min, max]. Two values per byte: row i of a group in
        the low nibble and row i + group/2 in the high one, so the last input axis is halved
        and unpacking is a concatenation inside each group (interleaved pairs made XLA:CPU
        shuffle every weight, 2.2x slower), which also keeps a group's bytes on its shard.
Round to nearest. int4 is affine because symmetric int4 wastes a level and centres every group
on zero: on the default model (SmolLM2-135M) symmetric groups of 128 cost +43% perplexity
(tests/test_quantization.py's text). It is packed by hand rather than stored as `jnp.int4`:
XLA:CPU lays out an int4 argument unpacked while its compiled programs expect it packed (a
layout mismatch at the first call), and a byte array is half the bytes on every backend; on TPU
the executor turns it into XLA's `uint4` (int4_codes).

The layers contract the integer weights in the step (`project`): on TPU and GPU the convert of
per-channel int8 fuses into XLA's dot, and grouped codes (int4, grouped int8) go to a Pallas
kernel that reads them and dequantizes in registers or VMEM (grouped_kernels, under tensor
parallelism too); on CPU XLA's grouped dots read the packed bytes. Tensor parallelism shards
scales like the axes they follow (scale_sharding).

Quantized: every linear layer (models.linear; the families declare which parameters are linear
weights, models.declare), an untied lm_head included. The embedding stays float (a gather, not
a matmul), and with it a tied lm_head.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.grouped_kernels import kernel_project, layer_kernel_project

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
# Rows a grouped dot is padded to where XLA writes the converted codes out below it: over
# `uint4` weights (TPU) and over grouped int8 on TPU and GPU (`project`).
GROUPED_MIN_ROWS = 8


@dataclasses.dataclass(frozen=True)
class Quantization:
    method: str  # "int8" | "int4"
    # int4: None is DEFAULT_GROUP_SIZE; int8: None is per output channel. 32 for a GGUF file of
    # Q4_0/Q4_1/Q4_K (int4) or Q8_0 (int8) tensors, whose blocks then load as they are
    # (executor.loading).
    group_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise FerrumError.invalid_config(f"quantization {self.method!r}: expected one of {list(METHODS)}")
        if self.group_size is not None and self.group_size < 1:
            raise FerrumError.invalid_config(f"quantization group_size={self.group_size}: must be >= 1")

    @classmethod
    def parse(cls, value: "str | Quantization | None") -> "Quantization | None":
        return value if value is None or isinstance(value, Quantization) else cls(value)

    @property
    def packed(self) -> bool:
        return self.method == "int4"

    @property
    def grouped(self) -> bool:
        return self.packed or self.group_size is not None

    def group(self, rows: int) -> int:
        """The group along a last input axis of `rows`: group_size, halved until it divides the
        axis (and, for int4, stays even: two nibbles)."""
        g = self.group_size or DEFAULT_GROUP_SIZE
        least = 2 if self.packed else 1
        while rows % g or g % least:
            g //= 2
            if g < least:
                raise FerrumError.invalid_config(
                    f"{self.method} groups need a divisor of the input axis {rows}; group_size {self.group_size} has none"
                )
        return g


def stored_shape(shape: tuple[int, ...], n_in: int, q: Quantization) -> tuple[int, ...]:
    """The integer array's shape for a float weight of `shape` (int4 halves the last input axis)."""
    if not q.packed:
        return tuple(shape)
    return (*shape[: n_in - 1], shape[n_in - 1] // 2, *shape[n_in:])


def float_shape(ints_shape: tuple[int, ...], n_in: int, packed: bool) -> tuple[int, ...]:
    """The float weight's shape of a stored integer weight `[(layers,) in..., out...]`; n_in
    counts a stacked weight's layer axis."""
    if not packed:
        return tuple(ints_shape)
    return (*ints_shape[: n_in - 1], ints_shape[n_in - 1] * 2, *ints_shape[n_in:])


def quantize(w, n_in: int, q: Quantization, xp=jnp):
    """(integer weights, float32 scales) of a float weight `[in..., out...]`, int4 packed; `xp`
    is jnp (in a program) or np (on the host, one layer at a time)."""
    out_shape = w.shape[n_in:]
    w = w.astype(xp.float32)
    if not q.grouped:
        k = math.prod(w.shape[:n_in])
        scale = xp.max(xp.abs(xp.reshape(w, (k, *out_shape))), axis=0) / 127
        scale = xp.where(scale == 0, xp.float32(1), scale).astype(xp.float32)
        return xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8), scale
    g = q.group(w.shape[n_in - 1])
    groups = math.prod(w.shape[:n_in]) // g
    wg = xp.reshape(w, (groups, g, *out_shape))
    if not q.packed:
        scale = xp.max(xp.abs(wg), axis=1) / 127
        scale = xp.where(scale == 0, xp.float32(1), scale).astype(xp.float32)
        return xp.reshape(xp.clip(xp.round(wg / scale[:, None]), -127, 127).astype(xp.int8), w.shape), scale
    low, high = xp.min(wg, axis=1), xp.max(wg, axis=1)
    step = (high - low) / 15
    step = xp.where(step == 0, xp.float32(1), step).astype(xp.float32)
    ints = xp.clip(xp.round((wg - low[:, None]) / step[:, None]), 0, 15).astype(xp.uint8)
    packed = (ints[:, : g // 2] | (ints[:, g // 2 :] << 4)).astype(xp.uint8)
    return xp.reshape(packed, stored_shape(w.shape, n_in, q)), xp.stack([step, low.astype(xp.float32)], axis=1)


def dequantize_groups(ints: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """The float weight `[in..., out...]` in `dtype` of grouped codes: int4 (packed bytes or
    `uint4`) or grouped int8 (per-channel int8 never needs it: its scales are applied to the
    matmul's result, see `project`)."""
    groups = scale.shape[0]
    step, offset = _steps_offsets(ints, scale, dtype)
    w = _group_codes(ints, groups, n_in).astype(dtype) * step[:, None]
    if offset is not None:
        w = w + offset[:, None]
    return w.reshape(float_shape(ints.shape, n_in, ints.dtype == jnp.uint8))


def _group_codes(ints: jax.Array, groups: int, n_in: int) -> jax.Array:
    """`[groups, group, out]` codes of packed bytes, `uint4` codes (int4_codes) or int8 ones."""
    grouped = ints.reshape(groups, -1, math.prod(ints.shape[n_in:]))
    if ints.dtype != jnp.uint8:
        return grouped
    return jnp.concatenate([grouped & 0xF, grouped >> 4], axis=1)


def _steps_offsets(ints: jax.Array, scale: jax.Array, dtype) -> tuple[jax.Array, jax.Array | None]:
    """`[groups, out]` steps, and offsets (int4) or None (int8, symmetric)."""
    groups = scale.shape[0]
    if ints.dtype == jnp.int8:
        return scale.reshape(groups, -1).astype(dtype), None
    return scale[:, 0].reshape(groups, -1).astype(dtype), scale[:, 1].reshape(groups, -1).astype(dtype)


def project(
    x_tk: jax.Array, weight: nnx.Param, scale: nnx.Param | None, n_in: int, dtype, out_dtype=None, backend=None,
    parallel: str | None = None,
) -> jax.Array:
    """`x_tk [tokens, K] @ weight [in..., out...] -> [tokens, out...]`, K the flattened inputs.

    Float weights are contracted in one dot, per-channel int8 ones too, their scales applied to
    the result. Grouped codes (int4, grouped int8) with few tokens (tokens x groups no more than
    K: decode) are contracted group by group and each group's step (and offset) applied to the
    `[tokens, groups, out]` partial sums, which is smaller than the weight: dequantizing the
    weight first made XLA:CPU broadcast the per-group scales over every element, 7x slower per
    layer than int8, and XLA:TPU write the dequantized weight out. `uint4` weights (TPU, see
    int4_codes), and grouped int8 on TPU and GPU, get at least GROUPED_MIN_ROWS rows, below which
    XLA writes the converted codes out (`python -m ferrum_jax.bench int4-forms`). With more
    tokens the partial sums would outgrow the weight, so the weight is dequantized once instead.
    backend: the step's `AttentionBackend` (its platform; where it has a `grouped_kernel`,
    grouped codes go to that Pallas kernel at any token count, see grouped_kernels), and
    parallel: "column" or "row", how tensor parallelism splits this layer (models.sharding).
    On GPU a decode step's float and per-channel int8 decoder weights go to a kernel that reads
    the layer from the stack (grouped_kernels.layer_kernel_project): XLA's gemm would copy it."""
    w = weight[...]
    out_shape = w.shape[n_in:]
    t, k = x_tk.shape
    s_value = None if scale is None else scale.get_value()
    per_channel = scale is not None and w.dtype == jnp.int8 and s_value.ndim == len(out_shape)
    if backend is not None and (scale is None or per_channel):
        y = layer_kernel_project(x_tk, weight.get_value(), s_value, n_in, dtype, out_dtype, backend, parallel)
        if y is not None:
            return y
    if scale is None:
        return jnp.dot(x_tk, w.reshape(k, -1), preferred_element_type=out_dtype).reshape(t, *out_shape)
    s = scale[...]
    if per_channel:
        # Per-output-channel scales commute with the contraction: scaling the `[tokens, out]`
        # result leaves the dot a bare convert to fuse. Scaling the weight first made XLA:GPU
        # write a dequantized copy of Llama-3-8B's lm_head (1.05 GB) every step.
        y = jnp.dot(x_tk, w.reshape(k, -1).astype(dtype), preferred_element_type=out_dtype)
        return (y * s.reshape(-1).astype(y.dtype)).reshape(t, *out_shape)
    groups = s.shape[0]
    if backend is not None:
        y = kernel_project(x_tk, weight.get_value(), scale.get_value(), n_in, dtype, out_dtype, backend, parallel)
        if y is not None:
            return y
    accelerator = backend is not None and backend.platform in ("tpu", "gpu")
    rows = max(t, GROUPED_MIN_ROWS) if w.dtype == jnp.uint4 or (w.dtype == jnp.int8 and accelerator) else t
    if rows * groups <= k:
        x_tk = jnp.pad(x_tk, ((0, rows - t), (0, 0)))
        return _grouped_partial_dots(x_tk, w, s, dtype, out_dtype)[:t].reshape(t, *out_shape)
    w = dequantize_groups(w, s, n_in, dtype)
    return jnp.dot(x_tk, w.reshape(k, -1), preferred_element_type=out_dtype).reshape(t, *out_shape)


def _grouped_partial_dots(x_tk: jax.Array, w: jax.Array, s: jax.Array, dtype, out_dtype) -> jax.Array:
    """`[tokens, out]`: grouped codes contracted per group, then each group's step and offset."""
    t = x_tk.shape[0]
    groups = s.shape[0]
    step, offset = _steps_offsets(w, s, dtype)
    # Groups lead (the dots' batch axis): with tokens leading XLA:CPU transposed every
    # partial sum, 4.5x slower at 8 tokens.
    if w.dtype != jnp.uint8:
        codes = w.reshape(groups, -1, step.shape[1]).astype(dtype)
        x_g = x_tk.reshape(t, groups, -1).transpose(1, 0, 2)
        partial = jnp.einsum("gti,gio->gto", x_g, codes, preferred_element_type=out_dtype)
        x_sum = x_g.sum(2)
    else:
        # Packed bytes: each group's halves against the low and the high nibbles.
        packed = w.reshape(groups, -1, step.shape[1])
        x_g = x_tk.reshape(t, groups, 2, packed.shape[1]).transpose(1, 2, 0, 3)
        low, high = (packed & 0xF).astype(dtype), (packed >> 4).astype(dtype)
        partial = jnp.einsum("gti,gio->gto", x_g[:, 0], low, preferred_element_type=out_dtype)
        partial += jnp.einsum("gti,gio->gto", x_g[:, 1], high, preferred_element_type=out_dtype)
        x_sum = x_g.sum((1, 3))
    y = jnp.einsum("gto,go->to", partial, step, preferred_element_type=out_dtype)
    if offset is None:
        return y
    return y + jnp.einsum("gt,go->to", x_sum, offset, preferred_element_type=out_dtype)
