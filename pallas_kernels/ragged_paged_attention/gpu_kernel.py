"""Ragged paged attention as a Pallas kernel lowered through Triton (NVIDIA/AMD GPUs).

Grid: (num_query_blocks, num_kv_heads, kv_splits). A query block is `queries_per_block`
consecutive tokens of the flat ragged batch; a program computes all q heads of one kv head's
GQA group for those tokens, as rows [queries_per_block * group_pow2, head_dim] (row t * gp + g is
q head kv_head * group + g of token block_start + t; the group is zero-padded to a power of two
because Triton tiles must be powers of two). It walks the sequences that own tokens of the
block (first/last precomputed per block in the wrapper) and for each one runs an online-softmax
loop over kv blocks of `pages_per_block` pages: the block's page ids are loaded from the page
table and K/V are gathered straight from the paged cache, so no contiguous copy of a sequence's
KV is ever materialised. Each KV page is loaded once per kv head and query block, feeding the
whole GQA group.

Split-K: with kv_splits > 1 each sequence's kv blocks are divided into kv_splits contiguous
chunks, one per grid index on the last axis; every program writes a float32 partial output and
its log-sum-exp, and the wrapper merges them. This only pays when the grid is otherwise too small
to occupy the GPU (decode batches) and contexts are long, which is what the default checks.
Triton has no scalar prefetch, so sequence bounds and page ids are ordinary global-memory loads.

Block sizes (all powers of two, a Triton requirement on tile shapes):
  queries_per_block (default 32 // group_pow2, at least 1): 32 rows per program keeps the q,
    score and accumulator tiles in registers at head_dim 128 and meets tl.dot's minimum of 16
    rows, while a decode batch (one token per sequence) wastes few rows per sequence visited.
  pages_per_block (default: 64 kv positions' worth, at least one page): a [32, 64] float32 score
    tile and two [64, head_dim] K/V tiles fit comfortably with 4 warps.
  kv_splits (default: up to 8 when the unsplit grid has fewer programs than ~2 waves of a large
    GPU and a sequence can span more than 1024 positions, else 1).
head_dim and page_size must be powers of two (the gathered tiles are [pages, page_size, head_dim]).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.cost import attention_cost, expected_context
from pallas_kernels.ragged_paged_attention.reference import token_sequence_ids
from pallas_kernels.ragged_paged_attention.block_bounds import attended_blocks
from pallas_kernels.ragged_paged_attention.validation import validate_static_args

# Named TritonCompilerParams in older jax.
_CompilerParams = (getattr(pltriton, "CompilerParams", None)
                   or getattr(pltriton, "TritonCompilerParams"))

TARGET_ROWS_PER_BLOCK = 32
TARGET_KV_PER_BLOCK = 64
MIN_DOT_DIM = 16
MAX_KV_SPLITS = 8
SPLIT_MIN_KV_PER_SPLIT = 1024
# Programs below which the grid cannot fill a large GPU (about two waves of ~132 SMs).
SPLIT_BELOW_PROGRAMS = 264
NUM_WARPS = 4
NUM_STAGES = 2
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _is_pow2(n):
  return n >= 1 and n & (n - 1) == 0


def _next_pow2(n):
  return 1 << max(0, (n - 1).bit_length())


def gpu_block_sizes(num_tokens, num_kv_heads, group, page_size, pages_per_seq, head_dim,
                    queries_per_block=None, pages_per_block=None, kv_splits=None):
  """Resolve and validate (queries_per_block, pages_per_block, kv_splits)."""
  group_pow2 = _next_pow2(group)
  if not _is_pow2(head_dim) or head_dim < MIN_DOT_DIM:
    raise ValueError(f"head_dim={head_dim} must be a power of two >= {MIN_DOT_DIM} on GPU")
  if not _is_pow2(page_size):
    raise ValueError(f"page_size={page_size} must be a power of two on GPU")
  if queries_per_block is None:
    queries_per_block = max(TARGET_ROWS_PER_BLOCK // group_pow2, 1)
    queries_per_block = min(queries_per_block, max(_next_pow2(num_tokens),
                                                   MIN_DOT_DIM // group_pow2, 1))
  if pages_per_block is None:
    pages_per_block = min(max(TARGET_KV_PER_BLOCK // page_size, 1), _next_pow2(pages_per_seq))
    pages_per_block = max(pages_per_block, -(-MIN_DOT_DIM // page_size))
  if not _is_pow2(queries_per_block) or queries_per_block * group_pow2 < MIN_DOT_DIM:
    raise ValueError(
        f"queries_per_block={queries_per_block} must be a power of two with "
        f"queries_per_block * {group_pow2} (group padded to a power of two) >= {MIN_DOT_DIM}")
  if not _is_pow2(pages_per_block) or pages_per_block * page_size < MIN_DOT_DIM:
    raise ValueError(
        f"pages_per_block={pages_per_block} must be a power of two with "
        f"pages_per_block * page_size({page_size}) >= {MIN_DOT_DIM}")
  if kv_splits is None:
    programs = -(-num_tokens // queries_per_block) * num_kv_heads
    by_length = pages_per_seq * page_size // SPLIT_MIN_KV_PER_SPLIT
    kv_splits = max(1, min(MAX_KV_SPLITS, by_length)) if programs < SPLIT_BELOW_PROGRAMS else 1
  if not 1 <= kv_splits <= MAX_KV_SPLITS:
    raise ValueError(f"kv_splits={kv_splits} must be in [1, {MAX_KV_SPLITS}]")
  return queries_per_block, pages_per_block, kv_splits


def _kernel(kv_lens_ref, page_indices_ref, cu_q_lens_ref, seq_lo_ref, seq_hi_ref,
            q_ref, k_ref, v_ref, *out_refs,
            sm_scale, sliding_window, soft_cap, group_pow2, queries_per_block, page_size,
            pages_per_block, num_pages, kv_splits):
  """One (query block, kv head, kv split) program; see the module docstring."""
  q_block = pl.program_id(0)
  split = pl.program_id(2)
  bq = queries_per_block
  rows = bq * group_pow2
  block_kv = pages_per_block * page_size
  head_dim = q_ref.shape[-1]
  block_start = q_block * bq
  tok_rk = block_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0),
                                 group_pow2)
  tok_r = block_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), group_pow2)
  q_rd = q_ref[...].reshape(rows, head_dim)

  def kv_block(j, carry, *, seq, pos_offset, first_tok, end_tok, kv_end):
    m_r, l_r, acc_rd = carry
    pages = page_indices_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
    # Table entries past a sequence's pages may hold anything; clamp so the gather stays
    # inside the cache, the positions they cover are masked out below.
    pages = jnp.clip(pages, 0, num_pages - 1)
    # The pages may be narrower than the queries (fp8): compute in the queries' dtype.
    k_kd = k_ref[pages].reshape(block_kv, head_dim).astype(q_rd.dtype)
    v_kd = v_ref[pages].reshape(block_kv, head_dim).astype(q_rd.dtype)
    kv_pos_k = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    kv_pos_rk = j * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    q_pos_rk = tok_rk + pos_offset
    mask_rk = (tok_rk >= first_tok) & (tok_rk < end_tok) & (kv_pos_rk <= q_pos_rk)
    if sliding_window is not None:
      mask_rk &= kv_pos_rk > q_pos_rk - sliding_window

    s_rk = lax.dot_general(q_rd, k_kd, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
      s_rk = soft_cap * jnp.tanh(s_rk / soft_cap)
    s_rk = jnp.where(mask_rk, s_rk, _MASK_VALUE)
    m_next = jnp.maximum(m_r, jnp.max(s_rk, axis=1))
    alpha = jnp.exp(m_r - m_next)
    p_rk = jnp.where(mask_rk, jnp.exp(s_rk - m_next[:, None]), 0.0)
    l_next = alpha * l_r + jnp.sum(p_rk, axis=1)
    # Rows of V past kv_end may be uninitialised cache slots; 0 * NaN would poison the sum.
    v_kd = jnp.where((kv_pos_k < kv_end)[:, None], v_kd, jnp.zeros_like(v_kd))
    pv_rd = lax.dot_general(p_rk.astype(v_kd.dtype), v_kd, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return m_next, l_next, acc_rd * alpha[:, None] + pv_rd

  def sequence(s, carry):
    out_rd, lse_r = carry
    first_tok, end_tok, pos_offset, kv_end, blk_begin, blk_end = attended_blocks(
        cu_q_lens_ref, kv_lens_ref, s, block_start, bq, block_kv, sliding_window)
    blk_end = jnp.maximum(blk_end, blk_begin)
    chunk = lax.div(blk_end - blk_begin + kv_splits - 1, kv_splits)
    lo = jnp.minimum(blk_begin + split * chunk, blk_end)
    hi = jnp.minimum(lo + chunk, blk_end)
    init = (jnp.full((rows,), _MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    body = functools.partial(kv_block, seq=s, pos_offset=pos_offset, first_tok=first_tok,
                             end_tok=end_tok, kv_end=kv_end)
    m_r, l_r, acc_rd = lax.fori_loop(lo, hi, body, init)
    seen_r = l_r > 0
    in_seq_r = (tok_r >= first_tok) & (tok_r < end_tok) & seen_r
    out_rd = jnp.where(in_seq_r[:, None], acc_rd / jnp.where(seen_r, l_r, 1.0)[:, None], out_rd)
    lse_r = jnp.where(in_seq_r, m_r + jnp.log(jnp.where(seen_r, l_r, 1.0)), lse_r)
    return out_rd, lse_r

  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK_VALUE, jnp.float32))
  out_rd, lse_r = lax.fori_loop(seq_lo_ref[q_block], seq_hi_ref[q_block] + 1, sequence, init)
  o_ref = out_refs[0]
  o_ref[...] = out_rd.reshape(o_ref.shape).astype(o_ref.dtype)
  if kv_splits > 1:
    lse_ref = out_refs[1]
    lse_ref[...] = lse_r.reshape(lse_ref.shape)


def _merge_splits(out_sbkgd, lse_sbkg):
  """Merge per-split normalised outputs [splits, ...] by their log-sum-exp weights."""
  lse_max = jnp.max(lse_sbkg, axis=0, keepdims=True)
  weight = jnp.exp(lse_sbkg - lse_max)
  return jnp.sum(weight[..., None] * out_sbkgd, axis=0) / jnp.sum(weight, axis=0)[..., None]


def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               *, sm_scale, sliding_window=None, soft_cap=None, interpret=False,
                               queries_per_block=None, pages_per_block=None, kv_splits=None):
  """Ragged paged attention on GPU via Triton; same contract as the reference.

  interpret=True runs the kernel body through the Pallas interpreter (how it is tested on CPU).
  """
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape
  num_seqs_max, pages_per_seq = page_indices.shape
  group = num_q_heads // num_kv_heads
  group_pow2 = _next_pow2(group)
  bq, pages_per_block, kv_splits = gpu_block_sizes(
      num_tokens, num_kv_heads, group, page_size, pages_per_seq, head_dim, queries_per_block,
      pages_per_block, kv_splits)
  num_blocks = -(-num_tokens // bq)
  padded_tokens = num_blocks * bq

  seq_ids_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, padded_tokens)
  seq_ids_bq = seq_ids_t.reshape(num_blocks, bq)
  seq_lo_b = seq_ids_bq[:, 0]
  seq_hi_b = jnp.max(jnp.where(valid_t.reshape(num_blocks, bq), seq_ids_bq, -1), axis=1)

  q_tkgd = jnp.pad(q.reshape(num_tokens, num_kv_heads, group, head_dim),
                   ((0, padded_tokens - num_tokens), (0, 0), (0, group_pow2 - group), (0, 0)))
  # Whole kv blocks are read from the table, so round it up to a multiple of the block.
  table_width = -(-pages_per_seq // pages_per_block) * pages_per_block
  page_indices = jnp.pad(page_indices.astype(jnp.int32),
                         ((0, 0), (0, table_width - pages_per_seq)))

  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
      group_pow2=group_pow2, queries_per_block=bq, page_size=page_size,
      pages_per_block=pages_per_block, num_pages=num_pages, kv_splits=kv_splits)
  whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))
  kv_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
  in_specs = [whole((num_seqs_max,)), whole((num_seqs_max, table_width)),
              whole((num_seqs_max + 1,)), whole((num_blocks,)), whole((num_blocks,)),
              pl.BlockSpec((bq, None, group_pow2, head_dim), lambda b, h, s: (b, h, 0, 0)),
              kv_spec, kv_spec]
  if kv_splits == 1:
    out_shape = jax.ShapeDtypeStruct(q_tkgd.shape, q.dtype)
    out_specs = pl.BlockSpec((bq, None, group_pow2, head_dim), lambda b, h, s: (b, h, 0, 0))
  else:
    out_shape = (jax.ShapeDtypeStruct((kv_splits,) + q_tkgd.shape, jnp.float32),
                 jax.ShapeDtypeStruct((kv_splits,) + q_tkgd.shape[:-1], jnp.float32))
    out_specs = (pl.BlockSpec((None, bq, None, group_pow2, head_dim),
                              lambda b, h, s: (s, b, h, 0, 0)),
                 pl.BlockSpec((None, bq, None, group_pow2), lambda b, h, s: (s, b, h, 0)))
  result = pl.pallas_call(
      kernel,
      grid=(num_blocks, num_kv_heads, kv_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      cost_estimate=attention_cost(
          num_tokens, num_q_heads, num_kv_heads, head_dim, num_seqs_max,
          expected_context(page_size, pages_per_seq, sliding_window), q.dtype, k_pages.dtype),
      name="ragged_paged_attention_gpu",
  )(kv_lens.astype(jnp.int32), page_indices, cu_q_lens.astype(jnp.int32), seq_lo_b, seq_hi_b,
    q_tkgd, k_pages, v_pages)
  out_tkgd = result if kv_splits == 1 else _merge_splits(*result).astype(q.dtype)
  return out_tkgd[:num_tokens, :, :group].reshape(num_tokens, num_q_heads, head_dim)
