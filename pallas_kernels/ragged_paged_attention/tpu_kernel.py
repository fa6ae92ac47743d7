"""Ragged paged attention as a Pallas Mosaic (TPU) kernel.

Grid: (num_kv_heads, num_query_blocks). A query block is `queries_per_block` consecutive tokens
of the flat ragged batch, so one block can hold the tail of one sequence, several whole decode
sequences and the head of another. Each grid point handles one kv head and one query block:

  * q arrives as a VMEM block of rows [group * queries_per_block, head_dim], row g * bq + i being
    q head (kv_head * group + g) of token (block_start + i). Folding the whole GQA group into the
    rows means every KV page is fetched once per kv head and feeds `group` times as many MXU rows,
    which is what makes decode (one token per sequence) worth a matmul at all.
  * The page table, kv_lens, cu_q_lens and the first/last live sequence of every query block are
    scalar-prefetched into SMEM; K/V pages stay in HBM (memory_space=ANY) and are copied page by
    page into a two-slot VMEM buffer with async DMAs. The work list is the flattened sequence of
    (sequence, kv block) pairs the query block needs; the DMA for the next pair, possibly of the
    next sequence, is issued before computing the current one, so the copy overlaps compute even
    for decode batches where each sequence needs a single kv block.
  * Online softmax state (running max m, normaliser l, accumulator) lives in float32 VMEM
    scratch, reset at each sequence's first kv block; at its last block the rows that belong to
    the sequence are written into the output block, which starts as zeros, so padding rows stay
    exactly zero.
  * Only pages holding positions the block can attend to are copied: the range ends at the
    block's last causal position and, with a sliding window, starts at the window's first block.
    Rows and columns outside the sequence are masked in the scores and V rows past the needed
    range are zeroed, so stale VMEM never reaches the output.

Block sizes:
  queries_per_block (default 32, multiple of 8): 32 tokens x the GQA group fills 128-256 MXU rows
    for typical groups; larger blocks waste rows on decode batches, where each sequence owns
    one row per head of the block.
  pages_per_block (default: enough pages for ~512 kv positions, capped at pages_per_seq): large
    enough that each DMA batch amortises its issue cost and the [rows, kv] score tile fills the
    lanes, small enough that 2 slots x K and V (2 MiB at head_dim 128 bf16) sit well inside
    VMEM on every TPU generation.
  page_size should be a multiple of 8 (16 for bfloat16) so pages land tile-aligned in VMEM;
  this is not enforced because interpret mode and tests use tiny pages.

Limits: the whole page table is scalar-prefetched, so seqs * pages_per_seq int32 entries must fit
in SMEM (tens of thousands of entries on current chips).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import attention_cost, expected_context
from pallas_kernels.ragged_paged_attention.reference import token_sequence_ids
from pallas_kernels.ragged_paged_attention.block_bounds import attended_blocks
from pallas_kernels.ragged_paged_attention.validation import validate_static_args

# Renamed from TPUCompilerParams / TPUInterpretParams in newer jax.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
_InterpretParams = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams")

DEFAULT_QUERIES_PER_BLOCK = 32
TARGET_KV_PER_BLOCK = 512
# Lane width of the m/l scratch: keeping the row statistics lane-replicated avoids relayouts.
_STAT_LANES = 128
# Finite mask value: -inf would turn exp(m_prev - m_next) into NaN for rows with nothing seen yet.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def tpu_block_sizes(num_tokens, page_size, pages_per_seq, queries_per_block=None,
                    pages_per_block=None):
  """Resolve and validate (queries_per_block, pages_per_block)."""
  if queries_per_block is None:
    queries_per_block = min(DEFAULT_QUERIES_PER_BLOCK, -(-num_tokens // 8) * 8)
  if pages_per_block is None:
    pages_per_block = max(1, min(pages_per_seq, TARGET_KV_PER_BLOCK // page_size))
  if queries_per_block < 8 or queries_per_block % 8:
    raise ValueError(f"queries_per_block={queries_per_block} must be a positive multiple of 8")
  if not 1 <= pages_per_block <= pages_per_seq:
    raise ValueError(
        f"pages_per_block={pages_per_block} must be in [1, pages_per_seq={pages_per_seq}]")
  return queries_per_block, pages_per_block


def tpu_interpret_params():
  """TPU interpreter settings: simulated DMAs/semaphores, race detection, NaN-filled scratch."""
  return _InterpretParams(detect_races=True, uninitialized_memory="nan")


def _kernel(kv_lens_ref, pages_ref, cu_q_lens_ref, seq_lo_ref, seq_hi_ref,
            q_ref, k_hbm, v_hbm,
            o_ref,
            k_buf, v_buf, sems, m_ref, l_ref, acc_ref,
            *, sm_scale, sliding_window, soft_cap, group, queries_per_block, page_size,
            pages_per_block, pages_per_seq, num_seqs_max):
  """One (kv head, query block) grid point; refs are described in the module docstring."""
  kv_head = pl.program_id(0)
  q_block = pl.program_id(1)
  bq = queries_per_block
  rows = group * bq
  block_kv = pages_per_block * page_size
  head_dim = q_ref.shape[-1]
  block_start = q_block * bq
  seq_lo = seq_lo_ref[q_block]
  seq_hi = seq_hi_ref[q_block]

  def plan(s):
    """Scalar bounds of sequence s inside this query block.

    Divisions are lax.div (truncating): operands are non-negative wherever the result is used,
    and jnp's floor division lowers through sign(), whose Mosaic lowering queries the TPU
    generation and so cannot be cross-lowered without a TPU.
    """
    s = jnp.minimum(s, num_seqs_max - 1)
    first_tok, end_tok, pos_offset, kv_end, blk_begin, blk_end = attended_blocks(
        cu_q_lens_ref, kv_lens_ref, s, block_start, bq, block_kv, sliding_window)
    blk_end = jnp.where((end_tok > first_tok) & (blk_end > blk_begin), blk_end, blk_begin)
    return dict(first_tok=first_tok, end_tok=end_tok, pos_offset=pos_offset, kv_end=kv_end,
                blk_begin=blk_begin, blk_end=blk_end, seq=s)

  def first_nonempty(s):
    def has_no_work(s):
      p = plan(s)
      return (s <= seq_hi) & (p["blk_end"] <= p["blk_begin"])
    s = lax.while_loop(has_no_work, lambda s: s + 1, s)
    return s, plan(s)["blk_begin"]

  def next_item(s, blk):
    return lax.cond(blk + 1 < plan(s)["blk_end"], lambda: (s, blk + 1),
                    lambda: first_nonempty(s + 1))

  def page_copies(s, blk, slot):
    """Descriptors for the pages of kv block blk of sequence s that hold needed positions."""
    p = plan(s)
    first_page = blk * pages_per_block
    num_pages = jnp.minimum(pages_per_block,
                            lax.div(p["kv_end"] + page_size - 1, page_size) - first_page)

    def copies(i):
      page = pages_ref[p["seq"] * pages_per_seq + first_page + i]
      dst = pl.ds(pl.multiple_of(i * page_size, page_size), page_size)
      return (pltpu.make_async_copy(k_hbm.at[kv_head, page], k_buf.at[slot, dst],
                                    sems.at[0, slot]),
              pltpu.make_async_copy(v_hbm.at[kv_head, page], v_buf.at[slot, dst],
                                    sems.at[1, slot]))
    return num_pages, copies

  def start_fetch(s, blk, slot):
    num_pages, copies = page_copies(s, blk, slot)

    def body(i, carry):
      for c in copies(i):
        c.start()
      return carry
    lax.fori_loop(0, num_pages, body, 0)

  def wait_fetch(s, blk, slot):
    num_pages, copies = page_copies(s, blk, slot)

    def body(i, carry):
      for c in copies(i):
        c.wait()
      return carry
    lax.fori_loop(0, num_pages, body, 0)

  # Token offset of each row inside the block: rows are (group, token) with token minor.
  row_tok_rk = lax.broadcasted_iota(jnp.int32, (group, bq, block_kv), 1).reshape(rows, block_kv)
  row_tok_rd = lax.broadcasted_iota(jnp.int32, (group, bq, head_dim), 1).reshape(rows, head_dim)

  def compute(p, blk, slot):
    kv_pos_rk = blk * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    tok_rk = block_start + row_tok_rk
    q_pos_rk = tok_rk + p["pos_offset"]
    mask_rk = ((tok_rk >= p["first_tok"]) & (tok_rk < p["end_tok"]) & (kv_pos_rk <= q_pos_rk))
    if sliding_window is not None:
      mask_rk &= kv_pos_rk > q_pos_rk - sliding_window

    q_rd = q_ref[...]
    k_kd = k_buf[slot].astype(q_rd.dtype)  # a no-op unless the pages are narrower (fp8)
    s_rk = lax.dot_general(q_rd, k_kd, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
      s_rk = soft_cap * jnp.tanh(s_rk / soft_cap)
    s_rk = jnp.where(mask_rk, s_rk, _MASK_VALUE)

    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s_rk, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p_rk = jnp.where(mask_rk, jnp.exp(s_rk - m_next[:, :1]), 0.0)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p_rk, axis=1, keepdims=True)
    m_ref[...] = m_next

    kv_pos_kd = blk * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)
    # Selects run in float32: older TPUs have no bf16 VPU, so a bf16 select would be unpacked
    # anyway. Zeroing unfetched rows matters because 0 * stale-NaN is NaN.
    v_buf_kd = v_buf[slot]
    v_kd = jnp.where(kv_pos_kd < p["kv_end"], v_buf_kd.astype(jnp.float32), 0.0)
    v_kd = v_kd.astype(q_rd.dtype)
    pv_rd = lax.dot_general(p_rk.astype(v_kd.dtype), v_kd, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv_rd

  def finalize(p):
    l = l_ref[...][:, :1]
    out_rd = acc_ref[...] / jnp.where(l > 0, l, 1.0)
    tok_rd = block_start + row_tok_rd
    in_seq_rd = (tok_rd >= p["first_tok"]) & (tok_rd < p["end_tok"])
    kept_rd = o_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.where(in_seq_rd, out_rd, kept_rd).astype(o_ref.dtype)

  o_ref[...] = jnp.zeros_like(o_ref)
  s0, blk0 = first_nonempty(seq_lo)

  @pl.when(s0 <= seq_hi)
  def _():
    start_fetch(s0, blk0, 0)

  def step(carry):
    s, blk, slot = carry
    next_s, next_blk = next_item(s, blk)

    @pl.when(next_s <= seq_hi)
    def _():
      start_fetch(next_s, next_blk, 1 - slot)

    p = plan(s)

    @pl.when(blk == p["blk_begin"])
    def _():
      m_ref[...] = jnp.full_like(m_ref, _MASK_VALUE)
      l_ref[...] = jnp.zeros_like(l_ref)
      acc_ref[...] = jnp.zeros_like(acc_ref)

    wait_fetch(s, blk, slot)
    compute(p, blk, slot)

    @pl.when(blk == p["blk_end"] - 1)
    def _():
      finalize(p)

    return next_s, next_blk, 1 - slot

  lax.while_loop(lambda c: c[0] <= seq_hi, step, (s0, blk0, jnp.int32(0)))


def ragged_paged_attention_tpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               *, sm_scale, sliding_window=None, soft_cap=None, interpret=False,
                               queries_per_block=None, pages_per_block=None):
  """Ragged paged attention on TPU; same contract as ragged_paged_attention_reference.

  interpret=True runs the kernel in the TPU interpreter with race detection (see
  tpu_interpret_params); that is how the kernel is tested on CPU.
  """
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  num_seqs_max, pages_per_seq = page_indices.shape
  group = num_q_heads // num_kv_heads
  bq, pages_per_block = tpu_block_sizes(num_tokens, page_size, pages_per_seq, queries_per_block,
                                        pages_per_block)
  num_blocks = -(-num_tokens // bq)
  padded_tokens = num_blocks * bq
  rows = group * bq
  block_kv = pages_per_block * page_size

  seq_ids_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, padded_tokens)
  seq_ids_bq = seq_ids_t.reshape(num_blocks, bq)
  seq_lo_b = seq_ids_bq[:, 0]
  seq_hi_b = jnp.max(jnp.where(valid_t.reshape(num_blocks, bq), seq_ids_bq, -1), axis=1)

  # [tokens, heads, d] -> [kv_heads, blocks, group * bq, d] so each grid point's q is one
  # contiguous, tile-aligned 2-D block and needs no in-kernel reshape.
  q_pad = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
  q_kbrd = (q_pad.reshape(num_blocks, bq, num_kv_heads, group, head_dim)
            .transpose(2, 0, 3, 1, 4).reshape(num_kv_heads, num_blocks, rows, head_dim))

  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, group=group,
      queries_per_block=bq, page_size=page_size, pages_per_block=pages_per_block,
      pages_per_seq=pages_per_seq, num_seqs_max=num_seqs_max)
  q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda h, b, *_: (h, b, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(num_kv_heads, num_blocks),
      in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=q_spec,
      scratch_shapes=[
          pltpu.VMEM((2, block_kv, head_dim), k_pages.dtype),
          pltpu.VMEM((2, block_kv, head_dim), v_pages.dtype),
          pltpu.SemaphoreType.DMA((2, 2)),
          pltpu.VMEM((rows, _STAT_LANES), jnp.float32),
          pltpu.VMEM((rows, _STAT_LANES), jnp.float32),
          pltpu.VMEM((rows, head_dim), jnp.float32),
      ])
  out_kbrd = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q_kbrd.shape, q.dtype),
      compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=tpu_interpret_params() if interpret else False,
      cost_estimate=attention_cost(
          num_tokens, num_q_heads, num_kv_heads, head_dim, num_seqs_max,
          expected_context(page_size, pages_per_seq, sliding_window), q.dtype, k_pages.dtype),
      name="ragged_paged_attention_tpu",
  )(kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32).reshape(-1),
    cu_q_lens.astype(jnp.int32), seq_lo_b, seq_hi_b, q_kbrd, k_pages, v_pages)
  out = (out_kbrd.reshape(num_kv_heads, num_blocks, group, bq, head_dim)
         .transpose(1, 3, 0, 2, 4).reshape(padded_tokens, num_q_heads, head_dim))
  return out[:num_tokens]
