"""Grouped quantized matmuls (int4, grouped int8) through the platform's Pallas kernel, and on
GPU one layer of a stacked float or per-channel int8 weight through the layer kernel
(`layer_kernel_project`), each read where it lies in the stack.

`kernel_project` is `quantization.project`'s route to pallas_kernels.grouped_matmul: the Triton
kernel over packed nibbles or int8 codes on GPU, the Mosaic kernel over `uint4` or int8 codes on
TPU (in the Pallas interpreter with the "pallas_interpret" backend, how CPU tests run it). It
returns None where the kernel does not apply, and `project` takes XLA's grouped dots.

A Pallas call is opaque to GSPMD, so under tensor parallelism it runs inside `shard_map`, on
each shard's part of the weight as `models.sharding` lays it out: a column-parallel layer
(q/k/v, gate/up, lm_head) splits its first output axis (left whole where it does not divide,
as replicated KV heads are), each shard computing its columns from the whole x; a row-parallel
layer (o, down) splits its first input axis, each shard contracting its slice of x, the partial
results summed over the shards (the all-reduce XLA's dot would do). A row-parallel layer whose
groups straddle shards (groups not divisible by the degree: its scales stay whole) keeps XLA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.models.scale_sharding import scale_spec
from pallas_kernels.grouped_matmul import (
    grouped_block_sizes, grouped_block_sizes_tpu, grouped_matmul_gpu, grouped_matmul_tpu, layer_block_sizes, layer_matmul_gpu,
)

PARALLEL = ("column", "row")


def kernel_project(x_tk, w, s, n_in: int, dtype, out_dtype, backend, parallel: str) -> jax.Array | None:
    """`x_tk [tokens, K] @ w [in..., out...]` for grouped codes `w` and scales `s`
    (quantization's forms; arrays, or `LayerSlice`s of the decoder's stacked weights) through
    the backend's Pallas kernel, or None where it does not apply."""
    kernel = backend.grouped_kernel
    if kernel is None or parallel not in PARALLEL:
        return None
    mesh = backend.mesh
    tp = 1 if mesh is None else mesh.shape["model"]
    out_shape = w.shape[n_in:]
    inner = s.ndim - len(out_shape) - 1  # int4's (step, offset) axis
    w_spec = _weight_spec(w.shape, n_in, parallel, tp)
    s_spec = scale_spec(w_spec, n_in, s.shape[0], tp, inner)
    if parallel == "row" and s_spec[0] is None:
        return None
    local_w = tuple(n // tp if e == "model" else n for n, e in zip(w.shape, tuple(w_spec) + (None,) * w.ndim))
    local_groups = s.shape[0] // tp if parallel == "row" else s.shape[0]
    if not _tiles(kernel, x_tk.shape[0], w.dtype, local_w, n_in, local_groups):
        return None
    interpret = backend.kind == "pallas_interpret"
    # A layer of the stacked decoder weights goes to the kernel as the stack and its index (read
    # in place, see layer_slice), except a stack of more than [layers, K, N] on TPU, where
    # flattening the whole stack to that would retile all of it.
    in_place = isinstance(w, LayerSlice) and (kernel == "gpu" or w.ndim == 2)
    codes, scales, index = (w.stack, s.stack, w.index) if in_place else (w[...], s[...], None)

    def local(x, codes, scales, *index):
        t, k = x.shape
        lead = codes.ndim - w.ndim  # the layer axis, when in place
        rows = k // 2 if codes.dtype == jnp.uint8 else k
        codes2 = codes.reshape(*codes.shape[:lead], rows, -1)
        scales2 = scales.reshape(*scales.shape[: lead + 1 + inner], -1)
        matmul = grouped_matmul_gpu if kernel == "gpu" else grouped_matmul_tpu
        y = matmul(x, codes2, scales2, *index, out_dtype=out_dtype or dtype, interpret=interpret)
        return y.reshape(t, *codes.shape[lead + n_in :])

    layer_axis = (None,) if in_place else ()
    return _sharded(local, mesh, parallel, (x_tk, codes, scales), index, (P(*layer_axis, *w_spec), P(*layer_axis, *s_spec)),
                    w_spec, n_in)


def layer_kernel_project(x_tk, w, s, n_in: int, dtype, out_dtype, backend, parallel: str) -> jax.Array | None:
    """`x_tk [tokens, K] @ w [in..., out...]` for a layer of the decoder's stacked float weights
    (or per-channel int8 codes `w` with scales `s [out...]`), a `LayerSlice`, through the GPU
    kernel that reads it in place (pallas_kernels.grouped_matmul.layer_gpu_kernel); None where it
    does not apply: not on GPU, not a stacked layer, or more tokens than a decode step (there a
    step is bound by its FLOPs, and cuBLAS is the faster gemm despite the slice it copies)."""
    if backend.grouped_kernel != "gpu" or parallel not in PARALLEL or not isinstance(w, LayerSlice):
        return None
    mesh = backend.mesh
    tp = 1 if mesh is None else mesh.shape["model"]
    w_spec = _weight_spec(w.shape, n_in, parallel, tp)
    local_w = [n // tp if e == "model" else n for n, e in zip(w.shape, tuple(w_spec) + (None,) * w.ndim)]
    try:
        layer_block_sizes(x_tk.shape[0], math.prod(local_w[:n_in]), math.prod(local_w[n_in:]))
    except ValueError:
        return None
    interpret = backend.kind == "pallas_interpret"

    def local(x, stack, *rest):
        *scales, index = rest
        t, k = x.shape
        scale = scales[0].reshape(scales[0].shape[0], -1) if scales else None
        y = layer_matmul_gpu(x, stack.reshape(stack.shape[0], k, -1), index, scale, out_dtype=out_dtype or dtype,
                             interpret=interpret)
        return y.reshape(t, *stack.shape[1 + n_in :])

    scales = () if s is None else (s.stack,)
    s_spec = P(None, *tuple(w_spec)[n_in:])  # per output: split as the outputs are
    specs = (P(None, *w_spec), *(s_spec for _ in scales))
    return _sharded(local, mesh, parallel, (x_tk, w.stack, *scales), w.index, specs, w_spec, n_in)


def _weight_spec(shape: tuple[int, ...], n_in: int, parallel: str, tp: int) -> P:
    """How the shards split a weight (see the module docstring)."""
    if parallel == "column":
        out = shape[n_in:]
        return P(*(None,) * n_in, "model" if out[0] % tp == 0 else None, *(None,) * (len(out) - 1))
    return P("model", *(None,) * (len(shape) - 1))


def _sharded(local, mesh, parallel: str, args: tuple, index, weight_specs: tuple, w_spec, n_in: int) -> jax.Array:
    """`local(x, *weights[, index])` on each shard of the mesh as the module docstring says (just
    called without tensor parallelism); a row-parallel layer's partial results summed."""
    tp = 1 if mesh is None else mesh.shape["model"]
    args = args + (() if index is None else (index,))

    def run(*a):
        y = local(*a)
        return jax.lax.psum(y, "model") if parallel == "row" and tp > 1 else y

    if tp == 1:
        return run(*args)
    x_spec = P(None, "model") if parallel == "row" else P()
    out_spec = P() if parallel == "row" else P(None, *tuple(w_spec)[n_in:])
    in_specs = (x_spec, *weight_specs) + (() if index is None else (P(),))
    return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def _tiles(kernel: str, t: int, dtype, w_shape: tuple[int, ...], n_in: int, groups: int) -> bool:
    """Whether the kernel takes codes of `dtype` and (per-shard) shape `w_shape`: packed int4 and
    grouped int8 on GPU, `uint4` and grouped int8 on TPU."""
    if dtype not in ((jnp.uint8, jnp.int8) if kernel == "gpu" else (jnp.uint4, jnp.int8)):
        return False
    packed_rows = math.prod(w_shape[:n_in])
    k = 2 * packed_rows if dtype == jnp.uint8 else packed_rows
    n, group = math.prod(w_shape[n_in:]), k // groups
    try:
        if kernel == "gpu":
            grouped_block_sizes(t, n, group, dtype == jnp.uint8)
        else:
            grouped_block_sizes_tpu(t, k, n, group, dtype == jnp.uint4)
    except ValueError:
        return False
    return True
