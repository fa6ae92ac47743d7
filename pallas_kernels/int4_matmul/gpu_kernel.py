"""Group-wise int4 matmul as a Pallas kernel lowered through Triton (NVIDIA GPUs).

`x [M, K] @ W [K, N]`, W held as ferrum's packed int4 (ferrum_jax.models.quantization): K falls
in groups of `g` consecutive rows, W ~ code * step + offset per (group, column), and the packed
bytes `[K / 2, N]` hold a group's row i in the low nibble and row i + g/2 in the high nibble of
packed row `group * g/2 + i`. XLA:GPU fuses no int4 form into its dots (it writes the converted
codes out, 112-140 MiB per Llama-3-8B MLP weight: `python -m ferrum_jax.bench int4-forms
--target gpu-h100`), so this kernel reads the packed bytes itself: half a byte per weight.

Grid: (M / block_m, N / block_n). A program walks the groups: it loads the group's `[g/2,
block_n]` bytes once, splits the nibbles in registers, contracts them with the group's two
halves of x (two tl.dots, float32 accumulation), and adds `partial * step + sum(x) * offset`
into a float32 `[block_m, block_n]` accumulator. Nothing dequantized ever leaves registers.

Block sizes are powers of two (Triton tiles): block_m at least 16 (tl.dot's minimum: decode rows
are padded to it), block_n 128 where N allows (else 64, 32, 16), g/2 at least 16 (groups of 32,
GGUF's, and up).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Named TritonCompilerParams in older jax.
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")

MIN_DOT_DIM = 16
MAX_BLOCK_M = 64
BLOCK_N_CHOICES = (128, 64, 32, 16)
NUM_WARPS = 4
NUM_STAGES = 3


def _next_pow2(n):
  return 1 << max(0, (n - 1).bit_length())


def int4_block_sizes(m: int, n: int, group: int) -> tuple[int, int]:
  """(block_m, block_n) for `[m, K] @ [K, n]` in groups of `group`; raises ValueError where the
  kernel cannot tile the problem (the caller then takes XLA's path)."""
  if group % 2 or group // 2 < MIN_DOT_DIM or group & (group - 1):
    raise ValueError(f"int4 group {group}: the kernel needs a power of two >= {2 * MIN_DOT_DIM}")
  block_n = next((b for b in BLOCK_N_CHOICES if n % b == 0), None)
  if block_n is None:
    raise ValueError(f"int4 output width {n}: the kernel needs a multiple of {BLOCK_N_CHOICES[-1]}")
  return min(max(_next_pow2(m), MIN_DOT_DIM), MAX_BLOCK_M), block_n


def _kernel(x_ref, w_ref, s_ref, o_ref, *, group, groups):
  half = group // 2
  block_m, block_n = o_ref.shape

  def body(j, acc):
    x_lo = x_ref[:, pl.ds(j * group, half)]
    x_hi = x_ref[:, pl.ds(j * group + half, half)]
    packed = w_ref[pl.ds(j * half, half), :]
    low = (packed & 0xF).astype(x_lo.dtype)
    high = (packed >> 4).astype(x_lo.dtype)
    partial = lax.dot(x_lo, low, preferred_element_type=jnp.float32)
    partial += lax.dot(x_hi, high, preferred_element_type=jnp.float32)
    step = s_ref[j, 0, :]
    offset = s_ref[j, 1, :]
    x_sum = jnp.sum(x_lo.astype(jnp.float32), axis=1) + jnp.sum(x_hi.astype(jnp.float32), axis=1)
    return acc + partial * step[None, :] + x_sum[:, None] * offset[None, :]

  acc = lax.fori_loop(0, groups, body, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def int4_matmul_gpu(x, packed, scale, *, out_dtype=None, interpret=False):
  """`x [M, K] @ W -> [M, N]` in out_dtype (x's dtype when None).

  packed `[K / 2, N]` uint8 and scale `[groups, 2, N]` float32 (step, offset) as described in
  the module docstring. interpret=True runs the kernel body in the Pallas interpreter (how it
  is tested on CPU)."""
  m, k = x.shape
  groups, two, n = scale.shape
  if two != 2 or packed.shape != (k // 2, n) or k % groups:
    raise ValueError(f"int4 matmul: x {x.shape}, packed {packed.shape}, scale {scale.shape} do not agree")
  group = k // groups
  block_m, block_n = int4_block_sizes(m, n, group)
  padded_m = -(-m // block_m) * block_m
  x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_kernel, group=group, groups=groups),
      grid=(padded_m // block_m, n // block_n),
      in_specs=[
          pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
          pl.BlockSpec((k // 2, block_n), lambda i, j: (0, j)),
          pl.BlockSpec((groups, 2, block_n), lambda i, j: (0, 0, j)),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype or x.dtype),
      compiler_params=_CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="int4_matmul",
  )(x, packed, scale)
  return out[:m]
