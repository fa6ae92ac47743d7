"""Group-wise quantized matmul as a Pallas kernel lowered through Mosaic (TPU).

`x [M, K] @ W [K, N]` with W in ferrum's TPU grouped forms (ferrum_jax.models.int4_codes,
quantization): K falls in groups of `g` consecutive rows with one scale per (group, column), and
  int4  codes `[K, N]` XLA `uint4`; scale `[groups, 2, N]`, W ~ code * step + offset;
  int8  codes `[K, N]` int8 (GGUF Q8_0's blocks); scale `[groups, N]`, W ~ code * scale.
XLA:TPU contracts these group by group and writes the `[groups, rows, N]` float32 partial sums
(and, for uint4, a retiled copy of the codes) to HBM; per step that is as many bytes as the int4
weights themselves. Here each `[block_k, block_n]` tile of codes is dequantized in VMEM (group by
group: a convert, a multiply and an add per weight on the VPU) into a `dtype` scratch tile that
feeds one MXU matmul, so HBM sees only the codes, the scales and x: the "dequantize in the
matmul's input pipeline" form.

Stacked decoder weights (`[layers, K, N]`) are read in place: the layer's index is a scalar
prefetched for the index maps (XLA would otherwise write the layer's slice out, retiled).

Grid: (M / block_m, N / block_n, K / block_k), K innermost ("arbitrary": a float32 accumulator
tile in VMEM carries the sum over K; the other two "parallel"). Block sizes: block_m the padded
rows (16 at least, the bfloat16 sublane tile) up to 256; block_n 512, 256 or 128 (a lane
multiple dividing N); block_k up to 2048, a multiple of the group and of 128 (x's lane axis),
whose groups fill whole 8-row scale tiles for int8.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import matmul_cost

MIN_BLOCK_M = 16
MAX_BLOCK_M = 256
BLOCK_N_CHOICES = (512, 256, 128)
BLOCK_K_CHOICES = (2048, 1024, 512, 256, 128)
SCALE_SUBLANES = 8


def grouped_block_sizes_tpu(m: int, k: int, n: int, group: int, packed: bool) -> tuple[int, int, int]:
  """(block_m, block_n, block_k); raises ValueError where the kernel cannot tile the problem
  (the caller then takes XLA's path)."""
  block_n = next((b for b in BLOCK_N_CHOICES if n % b == 0), None)
  if block_n is None:
    raise ValueError(f"output width {n}: the TPU kernel needs a multiple of {BLOCK_N_CHOICES[-1]}")
  if group % MIN_BLOCK_M:
    raise ValueError(f"group {group}: the TPU kernel needs a multiple of {MIN_BLOCK_M}")
  fits = lambda b: k % b == 0 and b % group == 0 and (packed or (b // group) % SCALE_SUBLANES == 0)  # noqa: E731
  block_k = next((b for b in BLOCK_K_CHOICES if fits(b)), None)
  if block_k is None:
    raise ValueError(f"inputs {k} in groups of {group}: no block of {BLOCK_K_CHOICES} fits")
  rows = -(-m // MIN_BLOCK_M) * MIN_BLOCK_M
  return min(rows, MAX_BLOCK_M), block_n, block_k


def _kernel(layer_ref, x_ref, w_ref, s_ref, o_ref, acc_ref, w_tile_ref, *, group, packed):
  del layer_ref  # consumed by the index maps
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  for j in range(w_ref.shape[0] // group):
    rows = slice(j * group, (j + 1) * group)
    codes = w_ref[rows, :].astype(jnp.float32)
    if packed:
      w = codes * s_ref[j, 0:1, :] + s_ref[j, 1:2, :]
    else:
      w = codes * s_ref[j : j + 1, :]
    w_tile_ref[rows, :] = w.astype(w_tile_ref.dtype)
  acc_ref[...] += jnp.dot(x_ref[...], w_tile_ref[...], preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def grouped_matmul_tpu(x, codes, scale, layer=None, *, out_dtype=None, interpret=False):
  """`x [M, K] @ W -> [M, N]` in out_dtype (x's dtype when None); codes and scale in one of the
  two forms of the module docstring, or stacked (a leading layer axis on both) with `layer` the
  int32 index of the one to use, which the index maps read (scalar prefetch): the layer's tiles
  are fetched from the stack in place. interpret=True runs the kernel in the Pallas interpreter."""
  if layer is None:
    codes, scale, layer = codes[None], scale[None], 0
  m, k = x.shape
  packed = codes.dtype == jnp.uint4
  layers, groups, n = codes.shape[0], scale.shape[1], scale.shape[-1]
  want_scale = (layers, groups, 2, n) if packed else (layers, groups, n)
  if codes.shape != (layers, k, n) or codes.dtype not in (jnp.uint4, jnp.int8) or scale.shape != want_scale or k % groups:
    raise ValueError(f"grouped matmul: x {x.shape}, codes {codes.shape} {codes.dtype}, scale {scale.shape} do not agree")
  group = k // groups
  block_m, block_n, block_k = grouped_block_sizes_tpu(m, k, n, group, packed)
  padded_m = -(-m // block_m) * block_m
  x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  groups_k = block_k // group
  if packed:
    scale_spec = pl.BlockSpec((None, groups_k, 2, block_n), lambda i, j, kk, layer: (layer[0], kk, 0, j))
  else:
    scale_spec = pl.BlockSpec((None, groups_k, block_n), lambda i, j, kk, layer: (layer[0], kk, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(padded_m // block_m, n // block_n, k // block_k),
      in_specs=[
          pl.BlockSpec((block_m, block_k), lambda i, j, kk, layer: (i, kk)),
          pl.BlockSpec((None, block_k, block_n), lambda i, j, kk, layer: (layer[0], kk, j)),
          scale_spec,
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk, layer: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32), pltpu.VMEM((block_k, block_n), x.dtype)],
  )
  if not interpret:
    # The kernel fetches one layer's tiles; left free, XLA's memory-space assignment on v6e
    # copied a whole stacked operand into VMEM before the call, every layer (the 32 MiB scale
    # stack of a 16-sequence decode: 1 GiB of HBM reads a step, 21% of the int4 weights).
    codes, scale = (pltpu.with_memory_space_constraint(a, pltpu.HBM) for a in (codes, scale))
  return pl.pallas_call(
      functools.partial(_kernel, group=group, packed=packed),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype or x.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=matmul_cost(padded_m, k, n, x.dtype, k * n // (2 if packed else 1), _layer_bytes(scale),
                                out_dtype or x.dtype),
      name="grouped_matmul_tpu",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), x, codes, scale)[:m]


def _layer_bytes(stacked) -> int:
  """Bytes of one layer of a stacked array."""
  return stacked.size // stacked.shape[0] * stacked.dtype.itemsize
