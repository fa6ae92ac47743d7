"""Pure-jnp ragged paged attention: the oracle for the kernels and the XLA path on CPU.

Layout (one layer):
  q             [tokens, num_q_heads, head_dim]   new tokens of all sequences, flat, padded
  k_pages       [num_kv_heads, num_pages, page_size, head_dim]
  v_pages       [num_kv_heads, num_pages, page_size, head_dim]
  kv_lens       [seqs] int32                      kv length per sequence, new tokens included
  page_indices  [seqs, pages_per_seq] int32       kv position p of sequence s is at slot
                                                  p % page_size of page_indices[s, p // page_size]
  cu_q_lens     [seqs + 1] int32                  sequence s owns q[cu_q_lens[s]:cu_q_lens[s+1]]
  num_seqs      int32 scalar array                sequences s >= num_seqs are padding

The leading kv-head axis of the pages lets tensor parallelism shard axis 0 and keeps one head's
page contiguous for DMA. New tokens' K/V are already in the pages when attention runs.

Query j of sequence s (q_len = cu_q_lens[s+1] - cu_q_lens[s]) sits at absolute position
kv_lens[s] - q_len + j and attends causally to kv positions 0..position inclusive, further limited
to positions > position - sliding_window when a window is given. Scores are sm_scale * q.k,
optionally soft-capped as soft_cap * tanh(scores / soft_cap), softmaxed in float32. q head h reads
kv head h // (num_q_heads // num_kv_heads). Rows t >= cu_q_lens[num_seqs] are exactly zero.
cu_q_lens entries past num_seqs need only be >= cu_q_lens[num_seqs]; page table entries past a
sequence's length are never trusted; a sequence with q_len 0 contributes nothing.

Memory: every token gathers its own sequence's pages, and tokens are processed in chunks of
TOKENS_PER_CHUNK, so the largest intermediate is [num_kv_heads, TOKENS_PER_CHUNK,
pages_per_seq * page_size, head_dim]; nothing scales with tokens * seqs * kv_len. All shapes are
static and num_seqs is traced, so padded batches reuse one compilation.
"""

import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention.validation import validate_static_args

# Tokens attended at once: bounds the gathered K/V to TOKENS_PER_CHUNK copies of a sequence's
# pages, at the price of a sequential loop over chunks for large buckets.
TOKENS_PER_CHUNK = 64


def token_sequence_ids(cu_q_lens, num_seqs, num_tokens):
  """Sequence id of every token and whether the token belongs to a live sequence.

  Returns ([tokens] int32 sequence ids clipped into range, [tokens] bool validity). Counting
  boundaries instead of a binary search keeps this correct when cu_q_lens past num_seqs is not
  sorted (the contract only promises those entries are >= cu_q_lens[num_seqs]).
  """
  num_seqs_max = cu_q_lens.shape[0] - 1
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  live_boundary = jnp.arange(1, num_seqs_max + 1, dtype=jnp.int32) <= num_seqs
  passed = (cu_q_lens[None, 1:] <= t[:, None]) & live_boundary[None, :]
  seq_ids = jnp.minimum(jnp.sum(passed, axis=1, dtype=jnp.int32), num_seqs_max - 1)
  valid = t < cu_q_lens[jnp.minimum(num_seqs, num_seqs_max)]
  return seq_ids, valid


def _attend(q_tkgd, pages_tp, pos_t, kv_len_t, valid_t, k_pages, v_pages, *, sm_scale,
            sliding_window, soft_cap):
  """Attention of a chunk of tokens, each over its own sequence's gathered pages.

  q_tkgd [tokens, kv_heads, group, head_dim]; pages_tp [tokens, pages_per_seq]; pos_t, kv_len_t,
  valid_t [tokens]. Returns float32 [tokens, kv_heads, group, head_dim], zero where not valid.
  """
  num_tokens, num_kv_heads, _, head_dim = q_tkgd.shape
  kv_capacity = pages_tp.shape[1] * k_pages.shape[2]
  k_ktld = k_pages[:, pages_tp].reshape(num_kv_heads, num_tokens, kv_capacity, head_dim)
  v_ktld = v_pages[:, pages_tp].reshape(num_kv_heads, num_tokens, kv_capacity, head_dim)

  scores_tkgl = jnp.einsum("tkgd,ktld->tkgl", q_tkgd, k_ktld,
                           preferred_element_type=jnp.float32) * sm_scale
  if soft_cap is not None:
    scores_tkgl = soft_cap * jnp.tanh(scores_tkgl / soft_cap)

  kv_pos_l = jnp.arange(kv_capacity, dtype=jnp.int32)
  mask_tl = (kv_pos_l[None, :] <= pos_t[:, None]) & (kv_pos_l[None, :] < kv_len_t[:, None])
  if sliding_window is not None:
    mask_tl &= kv_pos_l[None, :] > pos_t[:, None] - sliding_window
  mask_tl &= valid_t[:, None]
  mask_tkgl = mask_tl[:, None, None, :]

  # A finite fill keeps fully masked (padding) rows NaN-free; they are zeroed below anyway.
  scores_tkgl = jnp.where(mask_tkgl, scores_tkgl, jnp.finfo(jnp.float32).min)
  row_max_tkg = jnp.max(scores_tkgl, axis=-1, keepdims=True)
  probs_tkgl = jnp.where(mask_tkgl, jnp.exp(scores_tkgl - row_max_tkg), 0.0)
  denom_tkg = jnp.sum(probs_tkgl, axis=-1, keepdims=True)
  probs_tkgl = probs_tkgl / jnp.where(denom_tkg > 0, denom_tkg, 1.0)

  out_tkgd = jnp.einsum("tkgl,ktld->tkgd", probs_tkgl, v_ktld, preferred_element_type=jnp.float32)
  return jnp.where(valid_t[:, None, None, None], out_tkgd, 0.0)


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                                     num_seqs, *, sm_scale, sliding_window=None, soft_cap=None):
  """Ragged paged attention in plain jnp; see the module docstring for the contract."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  group = num_q_heads // num_kv_heads

  seq_ids_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, num_tokens)
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  kv_len_t = kv_lens[seq_ids_t]
  q_len_t = cu_q_lens[seq_ids_t + 1] - cu_q_lens[seq_ids_t]
  pos_t = kv_len_t - q_len_t + (t - cu_q_lens[seq_ids_t])
  per_token = (q.reshape(num_tokens, num_kv_heads, group, head_dim), page_indices[seq_ids_t],
               pos_t, kv_len_t, valid_t)
  attend = functools.partial(_attend, k_pages=k_pages, v_pages=v_pages, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap)

  if num_tokens <= TOKENS_PER_CHUNK:
    out_tkgd = attend(*per_token)
  else:
    num_chunks = -(-num_tokens // TOKENS_PER_CHUNK)
    pad = num_chunks * TOKENS_PER_CHUNK - num_tokens
    # Padded tokens are marked invalid (valid_t pads with False), so they come out zero.
    chunked = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
               .reshape(num_chunks, TOKENS_PER_CHUNK, *x.shape[1:]) for x in per_token]
    out_tkgd = lax.map(lambda xs: attend(*xs), chunked)
    out_tkgd = out_tkgd.reshape(num_chunks * TOKENS_PER_CHUNK, *out_tkgd.shape[2:])[:num_tokens]
  return out_tkgd.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
