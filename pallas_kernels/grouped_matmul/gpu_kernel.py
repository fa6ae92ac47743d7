"""Group-wise quantized matmul as a Pallas kernel lowered through Triton (NVIDIA GPUs).

`x [M, K] @ W [K, N]` with W in ferrum's grouped forms (ferrum_jax.models.quantization): K falls
in groups of `g` consecutive rows with one scale per (group, column), and
  int4  packed bytes `[K / 2, N]` uint8, a group's row i in the low nibble and row i + g/2 in the
        high nibble of packed row `group * g/2 + i`; scale `[groups, 2, N]`, W ~ code * step +
        offset;
  int8  codes `[K, N]` int8 (GGUF Q8_0's blocks); scale `[groups, N]`, W ~ code * scale.
XLA:GPU fuses neither into its dots: it writes the converted codes out (112-140 MiB per
Llama-3-8B MLP weight in int4), or with small groups the `[groups, rows, N]` float32 partial
sums of a grouped contraction (`python -m ferrum_jax.bench int4-forms --target gpu-h100`). This
kernel reads the codes themselves and keeps everything else in registers.

Stacked decoder weights (`[layers, ...]`) are read in place: the kernel takes the whole stack
and the layer's index (XLA would write the layer's slice out before a custom call).

Grid: (M / block_m, N / block_n). A program walks the groups: it loads the group's codes for
its `block_n` columns once (int4: `[g/2, block_n]` bytes whose nibbles it splits), contracts
them with the group's rows of x (tl.dot, float32 accumulation), and adds `partial * step (+
sum(x) * offset)` into a float32 `[block_m, block_n]` accumulator.

Block sizes are powers of two (Triton tiles): block_m at least 16 (tl.dot's minimum: decode rows
are padded to it), block_n 128 where N allows (else 64, 32, 16); the rows a tl.dot contracts
(g/2 for int4, g for int8) at least 16, so groups of 32 (GGUF's) and up.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.cost import matmul_cost

# Named TritonCompilerParams in older jax.
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")

MIN_DOT_DIM = 16
MAX_BLOCK_M = 64
BLOCK_N_CHOICES = (128, 64, 32, 16)
NUM_WARPS = 4
NUM_STAGES = 3


def _next_pow2(n):
  return 1 << max(0, (n - 1).bit_length())


def grouped_block_sizes(m: int, n: int, group: int, packed: bool) -> tuple[int, int]:
  """(block_m, block_n) for `[m, K] @ [K, n]` in groups of `group` (int4 when `packed`, else
  int8); raises ValueError where the kernel cannot tile the problem (the caller then takes
  XLA's path)."""
  rows = group // 2 if packed else group
  if group & (group - 1) or rows < MIN_DOT_DIM:
    raise ValueError(f"group {group}: the kernel needs a power of two >= {MIN_DOT_DIM * (2 if packed else 1)}")
  block_n = next((b for b in BLOCK_N_CHOICES if n % b == 0), None)
  if block_n is None:
    raise ValueError(f"output width {n}: the kernel needs a multiple of {BLOCK_N_CHOICES[-1]}")
  return min(max(_next_pow2(m), MIN_DOT_DIM), MAX_BLOCK_M), block_n


def _int4_kernel(layer_ref, x_ref, w_ref, s_ref, o_ref, *, group, groups):
  half = group // 2
  layer = layer_ref[0]

  def body(j, acc):
    x_lo = x_ref[:, pl.ds(j * group, half)]
    x_hi = x_ref[:, pl.ds(j * group + half, half)]
    packed = w_ref[layer, pl.ds(j * half, half), :]
    partial = lax.dot(x_lo, (packed & 0xF).astype(x_lo.dtype), preferred_element_type=jnp.float32)
    partial += lax.dot(x_hi, (packed >> 4).astype(x_lo.dtype), preferred_element_type=jnp.float32)
    x_sum = jnp.sum(x_lo.astype(jnp.float32), axis=1) + jnp.sum(x_hi.astype(jnp.float32), axis=1)
    return acc + partial * s_ref[layer, j, 0, :][None, :] + x_sum[:, None] * s_ref[layer, j, 1, :][None, :]

  o_ref[...] = lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _int8_kernel(layer_ref, x_ref, w_ref, s_ref, o_ref, *, group, groups):
  layer = layer_ref[0]

  def body(j, acc):
    x = x_ref[:, pl.ds(j * group, group)]
    codes = w_ref[layer, pl.ds(j * group, group), :].astype(x.dtype)
    return acc + lax.dot(x, codes, preferred_element_type=jnp.float32) * s_ref[layer, j, :][None, :]

  o_ref[...] = lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def grouped_matmul_gpu(x, codes, scale, layer=None, *, out_dtype=None, interpret=False):
  """`x [M, K] @ W -> [M, N]` in out_dtype (x's dtype when None).

  codes and scale in one of the two forms of the module docstring, or stacked (a leading layer
  axis on both) with `layer` the int32 index of the one to use: the kernel reads that layer of
  the stack in place, where slicing it first would copy it. interpret=True runs the kernel body
  in the Pallas interpreter (how it is tested on CPU)."""
  if layer is None:
    codes, scale, layer = codes[None], scale[None], 0
  m, k = x.shape
  packed = codes.dtype == jnp.uint8
  layers, groups, n = codes.shape[0], scale.shape[1], scale.shape[-1]
  want_codes, want_scale = ((layers, k // 2, n), (layers, groups, 2, n)) if packed else ((layers, k, n), (layers, groups, n))
  if codes.shape != want_codes or scale.shape != want_scale or k % groups:
    raise ValueError(f"grouped matmul: x {x.shape}, codes {codes.shape} {codes.dtype}, scale {scale.shape} do not agree")
  group = k // groups
  block_m, block_n = grouped_block_sizes(m, n, group, packed)
  padded_m = -(-m // block_m) * block_m
  x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  kernel = _int4_kernel if packed else _int8_kernel
  whole = lambda shape: pl.BlockSpec((*shape[:-1], block_n), lambda i, j: (0,) * (len(shape) - 1) + (j,))  # noqa: E731
  return pl.pallas_call(
      functools.partial(kernel, group=group, groups=groups),
      grid=(padded_m // block_m, n // block_n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, j: (0,)),
          pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
          whole(want_codes),
          whole(want_scale),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype or x.dtype),
      compiler_params=_CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      cost_estimate=matmul_cost(padded_m, k, n, x.dtype, codes.size // layers, scale.size // layers * scale.dtype.itemsize,
                                out_dtype or x.dtype),
      name="grouped_matmul",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), x, codes, scale)[:m]
