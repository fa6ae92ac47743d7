"""Ragged paged attention for plain XLA (the CPU path), with cost following the real work.

Same contract and layout as reference.py. The reference gathers all `pages_per_seq` pages for
every token, so its cost follows the capacity (`max_sequence_length`), not the context. Here the
step's tokens are cut into query blocks, each holding consecutive tokens of ONE sequence, and
groups of query blocks walk their sequences' pages in kv blocks of KV_BLOCK positions with an
online softmax (running max, running sum and output accumulated in float32). Both walks are
loops with traced trip counts: over the groups that hold a live token, and per group over the kv
blocks from the one holding the earliest position any of its tokens attends to (a sliding
window) to the one holding the furthest. So a decode at a 128-token context costs the same with
512 or 8192 positions of capacity, padding tokens and empty sequence slots cost nothing, and a
prompt's early blocks skip the kv blocks causality hides from them.

Two kinds of query block, because a kv block's pages are gathered once per query block (gather
traffic follows the blocks) while the score FLOPs follow the block's rows:
  one token      tokens of sequences with fewer than QUERY_BLOCK // 4 new tokens (decodes,
                 speculative verifies): a longer block would mostly compute empty rows.
  QUERY_BLOCK    tokens of longer chunks (prefills): each kv block is gathered once per
                 QUERY_BLOCK tokens instead of once per token.
In a mixed step (31 decodes next to a 481-token chunk) the decodes' groups stop at their own
contexts and the chunk's 16 blocks walk theirs.
A step with no more tokens than sequence slots (a decode bucket) uses one-token blocks only:
nothing there is long enough to gain, and each program compiles one kind instead of two.

Layout: inside the loops everything is [kv_heads, blocks, rows = tokens * group, ...], batch
dimensions leading, so neither dot transposes an operand or its result per kv block.
Memory: the largest intermediates are one group's kv block, [num_kv_heads, blocks, KV_BLOCK,
head_dim], and its scores, [num_kv_heads, blocks, rows, KV_BLOCK], with GROUP_TOKENS tokens a group.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention.cpu_kernel import kernel_supports, ragged_paged_attention_cpu
from pallas_kernels.ragged_paged_attention.reference import token_sequence_ids
from pallas_kernels.ragged_paged_attention.validation import validate_static_args

# kv positions per loop iteration: long enough to amortise the loop and keep the dots busy,
# short enough that a short context wastes little.
KV_BLOCK = 128
# Tokens of a long chunk's query block: the block shares one kv range, so its first token walks
# as far as its last; 32 keeps that causal waste under a quarter of a 128-position kv block.
QUERY_BLOCK = 32
# Query tokens per group (one trip of the outer loop): enough rows to keep the dots busy. A group
# of one-token blocks is smaller: each of its blocks, live or not, gathers a kv block of its own.
GROUP_TOKENS = 128
GROUP_TOKENS_ONE = 32


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Query blocks of `size` tokens over some of the step's sequences.

  seq_b [blocks] the sequence of each block (0 for blocks without a token, whose pages are then
  in range and masked out); tok_bq [blocks, size] token index (0 where not valid); valid_bq;
  pos_bq [blocks, size] each token's position; first_s [seqs] each sequence's first block;
  live the number of blocks holding a token; per_group blocks make one trip of the outer loop.
  """
  size: int
  per_group: int
  seq_b: jax.Array
  tok_bq: jax.Array
  valid_bq: jax.Array
  pos_bq: jax.Array
  first_s: jax.Array
  live: jax.Array


def _query_blocks(cu_q_lens, kv_lens, q_len_s, size, bound):
  """Blocks of `size` tokens over the sequences with q_len_s > 0, in sequence order; at most
  `bound` of them hold a token."""
  per_group = max(1, min((GROUP_TOKENS if size > 1 else GROUP_TOKENS_ONE) // size, bound))
  num_blocks = -(-max(bound, 1) // per_group) * per_group
  blocks_s = (q_len_s + size - 1) // size
  end_s = jnp.cumsum(blocks_s)
  first_s = end_s - blocks_s
  b = jnp.arange(num_blocks, dtype=jnp.int32)
  live_b = b < end_s[-1]
  seq_b = jnp.sum(end_s[None, :] <= b[:, None], axis=1, dtype=jnp.int32)
  # Block rows of padding sequence slots may name pages holding anything, even NaN, so a block
  # without a token reads sequence 0's pages (in range, and masked out).
  seq_b = jnp.where(live_b, jnp.minimum(seq_b, kv_lens.shape[0] - 1), 0)
  local_bq = (b - first_s[seq_b])[:, None] * size + jnp.arange(size, dtype=jnp.int32)[None, :]
  valid_bq = live_b[:, None] & (local_bq < q_len_s[seq_b][:, None])
  tok_bq = jnp.where(valid_bq, cu_q_lens[seq_b][:, None] + local_bq, 0)
  pos_bq = (kv_lens - q_len_s)[seq_b][:, None] + local_bq
  return _Blocks(size, per_group, seq_b, tok_bq, valid_bq, pos_bq, first_s, end_s[-1])


def _attend(q_tkgd, k_pages, v_pages, kv_lens, page_indices, blk: _Blocks, *, block_pages,
            sm_scale, sliding_window, soft_cap):
  """Attention of every block's tokens; float32 [blocks * size, kv_heads, group, head_dim]."""
  _, num_kv_heads, group, head_dim = q_tkgd.shape
  page_size = k_pages.shape[2]
  pages_per_seq = page_indices.shape[1]
  block = block_pages * page_size
  num_kv_blocks = -(-pages_per_seq // block_pages)
  size, per_group = blk.size, blk.per_group
  num_groups = blk.seq_b.shape[0] // per_group
  rows = size * group

  kv_len_b = kv_lens[blk.seq_b]
  # Padding the table to whole kv blocks with page 0 is safe: those positions are past kv_len.
  pages_bp = jnp.pad(page_indices[blk.seq_b], ((0, 0), (0, num_kv_blocks * block_pages - pages_per_seq)))
  q_kbrd = jnp.transpose(q_tkgd[blk.tok_bq], (2, 0, 1, 3, 4)).reshape(num_kv_heads, -1, rows, head_dim)
  valid_gx = blk.valid_bq.reshape(num_groups, -1)
  pos_gx = blk.pos_bq.reshape(num_groups, -1)
  end_g = jnp.max(jnp.where(valid_gx, pos_gx + 1, 0), axis=1)
  stop_g = jnp.minimum(-(-end_g // block), num_kv_blocks)
  start_g = jnp.zeros_like(stop_g)
  if sliding_window is not None:
    first_g = jnp.min(jnp.where(valid_gx, jnp.maximum(pos_gx - sliding_window + 1, 0), end_g[:, None]), axis=1)
    start_g = jnp.minimum(first_g // block, stop_g)

  def group_body(g, out_kbrd):
    lo = g * per_group

    def blocks(x, axis=0):
      return lax.dynamic_slice_in_dim(x, lo, per_group, axis=axis)

    q_kgrd, pages_gp, pos_gq, valid_gq, kv_len_g = (
        blocks(q_kbrd, 1), blocks(pages_bp), blocks(blk.pos_bq), blocks(blk.valid_bq), blocks(kv_len_b))

    def kv_body(j, carry):
      m_kgr, l_kgr, acc_kgrd = carry
      blk_gp = lax.dynamic_slice_in_dim(pages_gp, j * block_pages, block_pages, axis=1)
      k_kgld = k_pages[:, blk_gp].reshape(num_kv_heads, per_group, block, head_dim).astype(q_kgrd.dtype)
      v_kgld = v_pages[:, blk_gp].reshape(num_kv_heads, per_group, block, head_dim).astype(q_kgrd.dtype)
      s_kgrl = jnp.einsum("kgrd,kgld->kgrl", q_kgrd, k_kgld, preferred_element_type=jnp.float32) * sm_scale
      if soft_cap is not None:
        s_kgrl = soft_cap * jnp.tanh(s_kgrl / soft_cap)
      kv_pos_l = j * block + jnp.arange(block, dtype=jnp.int32)
      mask_gql = (kv_pos_l[None, None, :] <= pos_gq[:, :, None]) & valid_gq[:, :, None]
      mask_gql &= kv_pos_l[None, None, :] < kv_len_g[:, None, None]
      if sliding_window is not None:
        mask_gql &= kv_pos_l[None, None, :] > pos_gq[:, :, None] - sliding_window
      mask_1grl = jnp.broadcast_to(mask_gql[:, :, None, :], (per_group, size, group, block)).reshape(
          1, per_group, rows, block)
      s_kgrl = jnp.where(mask_1grl, s_kgrl, jnp.finfo(jnp.float32).min)
      m_new = jnp.maximum(m_kgr, jnp.max(s_kgrl, axis=-1))
      p_kgrl = jnp.where(mask_1grl, jnp.exp(s_kgrl - m_new[..., None]), 0.0)
      scale = jnp.exp(m_kgr - m_new)
      pv_kgrd = jnp.einsum("kgrl,kgld->kgrd", p_kgrl, v_kgld, preferred_element_type=jnp.float32)
      return m_new, l_kgr * scale + jnp.sum(p_kgrl, axis=-1), acc_kgrd * scale[..., None] + pv_kgrd

    stats = (num_kv_heads, per_group, rows)
    init = (jnp.full(stats, jnp.finfo(jnp.float32).min, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, head_dim), jnp.float32))
    _, l_kgr, acc_kgrd = lax.fori_loop(start_g[g], stop_g[g], kv_body, init)
    out_kgrd = acc_kgrd / jnp.where(l_kgr > 0, l_kgr, 1.0)[..., None]
    return lax.dynamic_update_slice_in_dim(out_kbrd, out_kgrd, lo, axis=1)

  live_groups = -(-blk.live // per_group)
  out_kbrd = lax.fori_loop(0, live_groups, group_body, jnp.zeros(q_kbrd.shape, jnp.float32))
  out_kbqgd = out_kbrd.reshape(num_kv_heads, -1, size, group, head_dim)
  return jnp.transpose(out_kbqgd, (1, 2, 0, 3, 4)).reshape(-1, num_kv_heads, group, head_dim)


def ragged_paged_attention_xla(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               *, sm_scale, sliding_window=None, soft_cap=None, cpu_kernel=False):
  """Ragged paged attention for XLA; see reference.py for the contract.

  cpu_kernel: one-token query blocks (decodes) go to cpu_kernel.cc where it supports the shapes
  (`kernel_supports`): it reads the pages in place instead of gathering them (XLA:CPU only; the
  caller checks it is built)."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  num_seqs_max, pages_per_seq = page_indices.shape
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  q_tkgd = q.reshape(num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
  size = min(QUERY_BLOCK, num_tokens)
  min_long = max(2, size // 4)
  q_len_s = jnp.where(jnp.arange(num_seqs_max) < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)
  long_s = q_len_s >= min_long
  # Long sequences each hold >= min_long tokens, so at most T // min_long of them end in a
  # partly filled block.
  long_bound = (num_tokens + min(num_seqs_max, num_tokens // min_long) * (size - 1)) // size
  kinds = [
      (jnp.where(long_s, 0, q_len_s), 1, min(num_tokens, num_seqs_max * (min_long - 1))),
      (jnp.where(long_s, q_len_s, 0), size, long_bound),
  ]
  if num_tokens <= num_seqs_max:
    # A decode-shaped step (no more tokens than slots) takes every token one by one: one kind
    # of block, correct for any chunk, halves the attention each such program compiles.
    kinds = [(q_len_s, 1, num_tokens)]
  options = dict(block_pages=max(1, min(KV_BLOCK // page_size, pages_per_seq)), sm_scale=sm_scale,
                 sliding_window=sliding_window, soft_cap=soft_cap)
  seq_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, num_tokens)
  local_t = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq_t]
  out_tkgd = jnp.zeros(q_tkgd.shape, jnp.float32)
  in_place = cpu_kernel and kernel_supports(q.shape, k_pages.shape, q.dtype, k_pages.dtype)
  for q_len_kind_s, kind_size, bound in kinds:
    mine_t = valid_t & (q_len_kind_s[seq_t] > 0)
    if in_place and kind_size == 1:
      kind_tkgd = ragged_paged_attention_cpu(
          q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, q_len_kind_s > 0, sm_scale=sm_scale,
          sliding_window=sliding_window, soft_cap=soft_cap).reshape(q_tkgd.shape)
    else:
      blk = _query_blocks(cu_q_lens, kv_lens, q_len_kind_s, kind_size, bound)
      out_xkgd = _attend(q_tkgd, k_pages, v_pages, kv_lens, page_indices, blk, **options)
      row_t = (blk.first_s[seq_t] + local_t // kind_size) * kind_size + local_t % kind_size
      kind_tkgd = out_xkgd[jnp.where(mine_t, row_t, 0)]
    out_tkgd = jnp.where(mine_t[:, None, None, None], kind_tkgd, out_tkgd)
  return out_tkgd.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
