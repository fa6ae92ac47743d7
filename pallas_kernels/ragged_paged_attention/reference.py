"""Pure-jnp ragged paged attention: the oracle for the kernels and the XLA path on CPU.

Layout (one layer):
  q             [tokens, num_q_heads, head_dim]       flat ragged batch of new tokens, padded to a bucket
  k_pages       [num_kv_heads, num_pages, page_size, head_dim]
  v_pages       [num_kv_heads, num_pages, page_size, head_dim]
  kv_lens       [seqs] int32                          kv length per sequence, new tokens included
  page_indices  [seqs, pages_per_seq] int32           kv position p of sequence s is in page
                                                      page_indices[s, p // page_size], slot p % page_size
  cu_q_lens     [seqs + 1] int32                      sequence s owns q[cu_q_lens[s]:cu_q_lens[s + 1]]
  num_seqs      int32 scalar array                    sequences s >= num_seqs are padding

Query j of sequence s (q_len = cu_q_lens[s+1] - cu_q_lens[s]) sits at absolute position
kv_lens[s] - q_len + j and attends causally to kv positions 0..position inclusive, further limited
to positions > position - sliding_window when a window is given. Scores are sm_scale * q.k,
optionally soft-capped as soft_cap * tanh(scores / soft_cap), softmaxed in float32. q head h reads
kv head h // (num_q_heads // num_kv_heads). Rows t >= cu_q_lens[num_seqs] are exactly zero.

Memory: every token gathers its own sequence's pages, so the largest intermediate is
[num_kv_heads, tokens, pages_per_seq * page_size, head_dim]; nothing scales with tokens * seqs *
kv_len. All shapes are static and num_seqs is traced, so padded batches reuse one compilation.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.validation import validate_static_args


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


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                                     num_seqs, *, sm_scale, sliding_window=None, soft_cap=None):
  """Ragged paged attention in plain jnp; see the module docstring for the contract."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  validate_static_args(q.shape, k_pages.shape, v_pages.shape, kv_lens.shape, page_indices.shape,
                       cu_q_lens.shape, sliding_window=sliding_window, soft_cap=soft_cap)
  group = num_q_heads // num_kv_heads
  pages_per_seq = page_indices.shape[1]
  kv_capacity = pages_per_seq * page_size

  seq_ids_t, valid_t = token_sequence_ids(cu_q_lens, num_seqs, num_tokens)
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  kv_len_t = kv_lens[seq_ids_t]
  q_len_t = cu_q_lens[seq_ids_t + 1] - cu_q_lens[seq_ids_t]
  pos_t = kv_len_t - q_len_t + (t - cu_q_lens[seq_ids_t])

  pages_tp = page_indices[seq_ids_t]
  k_ktld = k_pages[:, pages_tp].reshape(num_kv_heads, num_tokens, kv_capacity, head_dim)
  v_ktld = v_pages[:, pages_tp].reshape(num_kv_heads, num_tokens, kv_capacity, head_dim)

  q_tkgd = q.reshape(num_tokens, num_kv_heads, group, head_dim)
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

  out_tkgd = jnp.einsum("tkgl,ktld->tkgd", probs_tkgl, v_ktld.astype(jnp.float32),
                        preferred_element_type=jnp.float32)
  out_tkgd = jnp.where(valid_t[:, None, None, None], out_tkgd, 0.0)
  return out_tkgd.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
