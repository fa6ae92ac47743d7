"""One layer of a stacked float (or per-channel int8) weight, multiplied in place: a Pallas kernel
lowered through Triton (NVIDIA GPUs).

`x [M, K] @ W[layer]` for W `[layers, K, N]` in the model dtype, or int8 codes with a scale per
output column `[layers, N]` (W ~ codes * scale). XLA:GPU's gemm takes a buffer, so before
cuBLAS it writes the layer's dynamic slice of the stack out: every decoder weight read twice and
written once per step (Llama-3-8B bfloat16 decode on an H100, `python -m ferrum_jax.aot`: 26 GiB
of such traffic a step against 15 GiB of weights). This kernel reads the layer from the stack.

Grid: (M / block_m, N / block_n); a program walks K in blocks of `block_k`, loading x's and the
weight's tiles and accumulating their tl.dot in float32, then scales its columns (int8). It is
for steps still bound by reading the weights (up to MAX_ROWS rows; an H100 streams Llama-3-8B's
bfloat16 weights in the time of ~340 tokens' FLOPs): block_n is the widest that still gives
every streaming multiprocessor a few programs (MIN_PROGRAMS), since a narrow N (4096 for q and o)
in 128-wide tiles would keep 32 of an H100's 132 busy. Row blocks are the grid's first axis, so
the programs that share a weight tile are launched next to each other (their tile read from L2
after the first: unmeasured without a GPU).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.cost import matmul_cost
from pallas_kernels.grouped_matmul.gpu_kernel import MAX_BLOCK_M, MIN_DOT_DIM, NUM_STAGES, NUM_WARPS, _CompilerParams, _next_pow2

BLOCK_K = 64
MAX_ROWS = 256
BLOCK_N_CHOICES = (128, 64, 32, 16)
MIN_PROGRAMS = 256


def layer_block_sizes(m: int, k: int, n: int) -> tuple[int, int]:
  """(block_m, block_n) for `[m, k] @ [k, n]`; raises ValueError where the kernel does not apply
  (more than MAX_ROWS rows, a step bound by its FLOPs: cuBLAS is the better gemm there; K or N
  not tileable)."""
  if m > MAX_ROWS:
    raise ValueError(f"{m} rows: the kernel takes at most {MAX_ROWS}")
  if k % BLOCK_K:
    raise ValueError(f"contraction {k}: the kernel needs a multiple of {BLOCK_K}")
  fits = [b for b in BLOCK_N_CHOICES if n % b == 0]
  if not fits:
    raise ValueError(f"output width {n}: the kernel needs a multiple of {BLOCK_N_CHOICES[-1]}")
  block_n = next((b for b in fits if n // b >= MIN_PROGRAMS), fits[-1])
  return min(max(_next_pow2(m), MIN_DOT_DIM), MAX_BLOCK_M), block_n


def _kernel(layer_ref, x_ref, w_ref, *refs, steps):
  *scale_ref, o_ref = refs
  layer = layer_ref[0]

  def body(j, acc):
    x = x_ref[:, pl.ds(j * BLOCK_K, BLOCK_K)]
    w = w_ref[layer, pl.ds(j * BLOCK_K, BLOCK_K), :].astype(x.dtype)
    return acc + lax.dot(x, w, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  if scale_ref:
    acc = acc * scale_ref[0][layer, :][None, :].astype(jnp.float32)
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def layer_matmul_gpu(x, w, layer, scale=None, *, out_dtype=None, interpret=False):
  """`x [M, K] @ w[layer] -> [M, N]` in out_dtype (x's dtype when None), w `[layers, K, N]`
  (float, or int8 codes with `scale [layers, N]`), read in place. interpret=True runs the kernel
  body in the Pallas interpreter (how it is tested on CPU)."""
  m, k = x.shape
  layers, n = w.shape[0], w.shape[-1]
  if w.shape != (layers, k, n) or (scale is not None and scale.shape != (layers, n)):
    raise ValueError(f"layer matmul: x {x.shape}, w {w.shape}, scale {None if scale is None else scale.shape} do not agree")
  block_m, block_n = layer_block_sizes(m, k, n)
  padded_m = -(-m // block_m) * block_m
  x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  scales = () if scale is None else (scale,)
  return pl.pallas_call(
      functools.partial(_kernel, steps=k // BLOCK_K),
      grid=(padded_m // block_m, n // block_n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, j: (0,)),
          pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
          pl.BlockSpec((layers, k, block_n), lambda i, j: (0, 0, j)),
          *(pl.BlockSpec((layers, block_n), lambda i, j: (0, j)) for _ in scales),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype or x.dtype),
      compiler_params=_CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      cost_estimate=matmul_cost(padded_m, k, n, x.dtype, k * n * w.dtype.itemsize, 0 if scale is None else n * scale.dtype.itemsize,
                                out_dtype or x.dtype),
      name="layer_matmul",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), x, w, *scales)[:m]
