"""Ragged paged attention for plain XLA (the CPU path), with cost following the real kv lengths.

Same contract and layout as reference.py. The reference gathers all `pages_per_seq` pages for
every token, so its cost follows the capacity (`max_sequence_length`), not the context. Here each
token walks its own sequence's pages in blocks of KV_BLOCK positions with an online softmax
(running max, running sum and output accumulated in float32), and the walk is a loop whose trip
count is traced: it stops after the block holding the furthest position any live token attends
to, and with a sliding window it starts at the block holding the earliest. A decode step at a
128-token context therefore costs the same with 512 or 8192 positions of capacity.

Two ways to read a block, chosen from the static shapes:
  per token     each token gathers its own sequence's pages, [num_kv_heads, tokens, KV_BLOCK,
                head_dim]: right for decode-heavy batches, where tokens ~ sequences.
  per sequence  each sequence's pages are gathered once, [num_kv_heads, seqs, KV_BLOCK,
                head_dim], and every token scores against all of them with the other sequences
                masked: with at most PER_SEQUENCE_MAX_SEQS sequences slots and more tokens than
                that (a prefill), this reads a prompt's KV once per block instead of once per
                token (a 512-token prefill gathered 512 copies) for at most that many times the
                score FLOPs.

Memory: the largest intermediate is one block, [num_kv_heads, tokens, KV_BLOCK, head_dim] per
token, [tokens, num_kv_heads, group, seqs, KV_BLOCK] scores per sequence.
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention.reference import token_sequence_ids
from pallas_kernels.ragged_paged_attention.validation import validate_static_args

# kv positions per loop iteration: long enough to amortise the loop and keep GEMMs busy, short
# enough that a short context wastes little.
KV_BLOCK = 128
PER_SEQUENCE_MAX_SEQS = 4


def ragged_paged_attention_xla(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               *, sm_scale, sliding_window=None, soft_cap=None):
  """Ragged paged attention for XLA; see reference.py for the contract."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  pages_per_seq = page_indices.shape[1]
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  group = num_q_heads // num_kv_heads
  block_pages = max(1, min(KV_BLOCK // page_size, pages_per_seq))
  block = block_pages * page_size
  num_blocks = -(-pages_per_seq // block_pages)

  seq_ids_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, num_tokens)
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  kv_len_t = kv_lens[seq_ids_t]
  pos_t = kv_len_t - (cu_q_lens[seq_ids_t + 1] - cu_q_lens[seq_ids_t]) + (t - cu_q_lens[seq_ids_t])
  # Padding the table to whole blocks with page 0 is safe: those positions are past kv_len.
  pages_tp = jnp.pad(page_indices[seq_ids_t], ((0, 0), (0, num_blocks * block_pages - pages_per_seq)))
  q_tkgd = q.reshape(num_tokens, num_kv_heads, group, head_dim)

  end = jnp.max(jnp.where(valid_t, pos_t + 1, 0))
  stop = jnp.minimum(-(-end // block), num_blocks)
  start = 0
  if sliding_window is not None:
    first = jnp.min(jnp.where(valid_t, jnp.maximum(pos_t - sliding_window + 1, 0), end))
    start = jnp.minimum(first // block, stop)

  num_seqs_max = page_indices.shape[0]
  per_sequence = num_seqs_max <= PER_SEQUENCE_MAX_SEQS and num_tokens > num_seqs_max
  if per_sequence:
    pages_sp = jnp.pad(page_indices, ((0, 0), (0, num_blocks * block_pages - pages_per_seq)))
    # Padding sequences read sequence 0's pages (masked out like any other foreign key): their
    # own table rows may name pages holding anything, even NaN, and 0 * NaN would reach the output.
    pages_sp = jnp.where((jnp.arange(num_seqs_max) < num_seqs)[:, None], pages_sp, pages_sp[0])
    own_ts = (seq_ids_t[:, None] == jnp.arange(num_seqs_max)[None, :]) & valid_t[:, None]

  def scores_and_mask(j):
    """Scores `[tokens, kv_heads, group, keys]`, their mask broadcastable to them, and V
    `[kv_heads, keys, head_dim]` with the matching key order, for kv block j."""
    kv_pos_l = j * block + jnp.arange(block, dtype=jnp.int32)
    if per_sequence:
      blk_sp = lax.dynamic_slice_in_dim(pages_sp, j * block_pages, block_pages, axis=1)
      k_ksld = k_pages[:, blk_sp].reshape(num_kv_heads, num_seqs_max, block, head_dim)
      v_kxd = v_pages[:, blk_sp].reshape(num_kv_heads, num_seqs_max * block, head_dim)
      s_tkgx = jnp.einsum("tkgd,ksld->tkgsl", q_tkgd, k_ksld, preferred_element_type=jnp.float32)
      s_tkgx = s_tkgx.reshape(num_tokens, num_kv_heads, group, num_seqs_max * block)
      mask_tsl = own_ts[:, :, None] & (kv_pos_l[None, None, :] < kv_lens[None, :, None])
      mask_tsl &= kv_pos_l[None, None, :] <= pos_t[:, None, None]
      if sliding_window is not None:
        mask_tsl &= kv_pos_l[None, None, :] > pos_t[:, None, None] - sliding_window
      return s_tkgx, mask_tsl.reshape(num_tokens, 1, 1, num_seqs_max * block), v_kxd
    blk_tp = lax.dynamic_slice_in_dim(pages_tp, j * block_pages, block_pages, axis=1)
    k_ktld = k_pages[:, blk_tp].reshape(num_kv_heads, num_tokens, block, head_dim)
    v_ktld = v_pages[:, blk_tp].reshape(num_kv_heads, num_tokens, block, head_dim)
    s_tkgl = jnp.einsum("tkgd,ktld->tkgl", q_tkgd, k_ktld, preferred_element_type=jnp.float32)
    mask_tl = (kv_pos_l[None, :] <= pos_t[:, None]) & (kv_pos_l[None, :] < kv_len_t[:, None])
    if sliding_window is not None:
      mask_tl &= kv_pos_l[None, :] > pos_t[:, None] - sliding_window
    return s_tkgl, (mask_tl & valid_t[:, None])[:, None, None, :], v_ktld

  def body(j, carry):
    m_tkg, l_tkg, acc_tkgd = carry
    s_tkgx, mask, v = scores_and_mask(j)
    s_tkgx = s_tkgx * sm_scale
    if soft_cap is not None:
      s_tkgx = soft_cap * jnp.tanh(s_tkgx / soft_cap)
    s_tkgx = jnp.where(mask, s_tkgx, jnp.finfo(jnp.float32).min)
    m_new = jnp.maximum(m_tkg, jnp.max(s_tkgx, axis=-1))
    p_tkgx = jnp.where(mask, jnp.exp(s_tkgx - m_new[..., None]), 0.0)
    scale_tkg = jnp.exp(m_tkg - m_new)
    if per_sequence:
      pv_tkgd = jnp.einsum("tkgx,kxd->tkgd", p_tkgx, v, preferred_element_type=jnp.float32)
    else:
      pv_tkgd = jnp.einsum("tkgl,ktld->tkgd", p_tkgx, v, preferred_element_type=jnp.float32)
    return m_new, l_tkg * scale_tkg + jnp.sum(p_tkgx, axis=-1), acc_tkgd * scale_tkg[..., None] + pv_tkgd

  init = (jnp.full((num_tokens, num_kv_heads, group), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
          jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32))
  _, l_tkg, acc_tkgd = lax.fori_loop(start, stop, body, init)
  out_tkgd = acc_tkgd / jnp.where(l_tkg > 0, l_tkg, 1.0)[..., None]
  out_tkgd = jnp.where(valid_t[:, None, None, None], out_tkgd, 0.0)
  return out_tkgd.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
