"""How int4 weights sit on device: nibble-packed bytes, or XLA's own `uint4` on TPU.

The packed form (`quantization.quantize`: a uint8 array, two codes per byte, a group's first half
in the low nibbles and its second half in the high ones, the last input axis halved) is what
the loaders produce and what orbax stores, on every platform.

On TPU the grouped matmuls read XLA's own `uint4` type, stored in the float layout `[in...,
out...]` (the compiler packs two codes per byte in HBM: the same bytes as the packed form): the
Mosaic kernel (pallas_kernels.grouped_matmul) converts uint4 tiles in VMEM, and XLA's grouped
dots (where the kernel does not apply) fuse uint4 into the dot from 8 rows up (`project` pads
decode rows),
where over packed bytes the masks, shifts and concatenation that unpack them are written out as
a dequantized copy of the weight every step (`python -m ferrum_jax.bench int4-forms --target
tpu-v6e-1`). So on TPU the executor converts each packed weight once when it receives its state
(`to_uint4`), and saving a checkpoint packs them back (`to_packed`).

XLA:CPU runs the packed form faster (one byte load feeds two codes), so CPU keeps it; on GPU
neither form fuses and the Pallas kernel (pallas_kernels.grouped_matmul) reads the packed bytes.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.param_tree import flatten_state, unflatten_into
from ferrum_jax.models.declare import LAYER_PREFIX, WEIGHT, scale_path

UINT4_PLATFORMS = ("tpu",)


def wants_uint4(platform: str) -> bool:
    return platform in UINT4_PLATFORMS


def _grouping(path: str, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading axes before the inputs, input axes, groups) of a quantized int4 weight at `path`:
    its scales are `[lead..., groups, 2, out...]`, so the rest of the weight's axes are inputs."""
    lead = 1 if path.startswith(LAYER_PREFIX) else 0
    n_out = len(scale_shape) - lead - 2
    return lead, len(shape) - lead - n_out, scale_shape[lead]


def unpack(packed: jax.Array, lead: int, n_in: int, groups: int) -> jax.Array:
    """`uint4 [lead..., in..., out...]` codes of packed bytes `[lead..., in... (last halved), out...]`."""
    shape = packed.shape
    grouped = packed.reshape(*shape[:lead], groups, -1, math.prod(shape[lead + n_in :]))
    codes = jnp.concatenate([grouped & 0xF, grouped >> 4], axis=lead + 1)
    full = (*shape[: lead + n_in - 1], 2 * shape[lead + n_in - 1], *shape[lead + n_in :])
    return codes.astype(jnp.uint4).reshape(full)


def pack(codes: jax.Array, lead: int, n_in: int, groups: int) -> jax.Array:
    """The packed bytes of `uint4` codes (the inverse of `unpack`)."""
    shape = codes.shape
    grouped = codes.astype(jnp.uint8).reshape(*shape[:lead], groups, 2, -1, math.prod(shape[lead + n_in :]))
    low, high = grouped[(slice(None),) * (lead + 1) + (0,)], grouped[(slice(None),) * (lead + 1) + (1,)]
    half = (*shape[: lead + n_in - 1], shape[lead + n_in - 1] // 2, *shape[lead + n_in :])
    return (low | (high << 4)).reshape(half)


def _convert(flat: dict, src_dtype, fn) -> dict:
    """`flat` with every quantized int4 weight of `src_dtype` passed through `fn(array, lead,
    n_in, groups)`, one weight per program so one extra weight at most is alive, its sharding kept."""
    out = dict(flat)
    for path, w in flat.items():
        scale = flat.get(scale_path(path)) if path.endswith(WEIGHT) else None
        if scale is None or w.dtype != src_dtype:
            continue
        args = _grouping(path, w.shape, scale.shape)
        if isinstance(w, jax.ShapeDtypeStruct):
            out[path] = jax.eval_shape(lambda a: fn(a, *args), w)
            out[path] = jax.ShapeDtypeStruct(out[path].shape, out[path].dtype, sharding=w.sharding)
        else:
            with warnings.catch_warnings():
                # Donated so the old form is freed at once; its dtype differs, so XLA says it
                # could not reuse the buffer.
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                out[path] = jax.jit(lambda a: fn(a, *args), out_shardings=w.sharding, donate_argnums=0)(w)
    return out


def to_uint4(flat: dict) -> dict:
    """Packed int4 weights (arrays or ShapeDtypeStructs) as `uint4` codes; others unchanged."""
    return _convert(flat, jnp.uint8, unpack)


def to_packed(flat: dict) -> dict:
    """`uint4` int4 weights back to the packed bytes checkpoints hold; others unchanged."""
    return _convert(flat, jnp.uint4, pack)


def state_to_uint4(state: nnx.State) -> nnx.State:
    """`to_uint4` over an NNX state."""
    return unflatten_into(state, to_uint4(flatten_state(state)))
