"""Which KV positions one query block of one sequence attends to: shared by both kernels.

Divisions are lax.div (truncating): operands are non-negative wherever the result is used,
and jnp's floor division lowers through sign(), whose Mosaic lowering queries the TPU
generation and so cannot be cross-lowered without a TPU.
"""

import jax.numpy as jnp
from jax import lax


def attended_blocks(cu_q_lens_ref, kv_lens_ref, s, block_start, bq, block_kv, sliding_window):
  """Returns (first_tok, end_tok, pos_offset, kv_end, blk_begin, blk_end) for sequence s and
  the query block [block_start, block_start + bq): its token range, the offset from token
  index to absolute position, the causal KV end, and the KV blocks [blk_begin, blk_end) it
  reads (blk_end unclamped: callers decide how an empty range is represented)."""
  q_start = cu_q_lens_ref[s]
  q_end = cu_q_lens_ref[s + 1]
  kv_len = kv_lens_ref[s]
  first_tok = jnp.maximum(q_start, block_start)
  end_tok = jnp.minimum(q_end, block_start + bq)
  pos_offset = kv_len - (q_end - q_start) - q_start
  kv_end = jnp.minimum(kv_len, end_tok + pos_offset)
  kv_begin = jnp.int32(0)
  if sliding_window is not None:
    kv_begin = jnp.maximum(0, first_tok + pos_offset - sliding_window + 1)
  blk_begin = lax.div(kv_begin, block_kv)
  blk_end = lax.div(kv_end + block_kv - 1, block_kv)
  return first_tok, end_tok, pos_offset, kv_end, blk_begin, blk_end
