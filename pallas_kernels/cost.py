"""What each kernel costs, as the `pl.CostEstimate` its pallas_call carries.

XLA counts a custom call as free unless told: Mosaic (TPU) writes the estimate into the call's
backend config, where XLA's cost analysis and scheduler read it (and ferrum_jax.aot.hlo_traffic
too); the Triton lowering (GPU) drops it, so there the roofline counts the matmul kernels from
their operand shapes instead.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl


def _bytes(shape, dtype) -> int:
  n = 1
  for d in shape:
    n *= d
  return n * jnp.dtype(dtype).itemsize


def matmul_cost(m: int, k: int, n: int, x_dtype, weight_bytes: int, scale_bytes: int, out_dtype) -> pl.CostEstimate:
  """`[m, k] @ [k, n]`: one layer's weight (and its scales) read once, x read and the output
  written once."""
  return pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=_bytes((m, k), x_dtype) + weight_bytes + scale_bytes + _bytes((m, n), out_dtype))


def expected_context(page_size: int, pages_per_seq: int, sliding_window: int | None) -> int:
  """The KV tokens a query is taken to attend to: the lengths are runtime values, so half the
  table's capacity (aot's roofline default, max_model_len / 2), or the window if shorter."""
  context = pages_per_seq * page_size // 2
  return min(context, sliding_window) if sliding_window else context


def attention_cost(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, num_seqs: int,
                   context: int, q_dtype, kv_dtype) -> pl.CostEstimate:
  """Every query token against `context` KV tokens (QK^T and PV: 4 flops a head dim, one exp a
  score); every sequence's context read once in K and V, q read and the output written."""
  return pl.CostEstimate(
      flops=4 * num_tokens * num_q_heads * head_dim * context,
      transcendentals=num_tokens * num_q_heads * context,
      bytes_accessed=2 * _bytes((num_seqs, context, num_kv_heads, head_dim), kv_dtype)
      + 2 * _bytes((num_tokens, num_q_heads, head_dim), q_dtype))
