"""Backend selection for ragged paged attention.

backend="auto" picks the XLA reference on every platform for now; "reference" forces it.
"""

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

BACKENDS = ("auto", "reference")


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, backend="auto",
                           interpret=False, **block_sizes):
  """Ragged paged attention over one layer's pages.

  q [tokens, num_q_heads, head_dim]; k_pages/v_pages [num_kv_heads, num_pages, page_size,
  head_dim]; kv_lens [seqs]; page_indices [seqs, pages_per_seq]; cu_q_lens [seqs + 1]; num_seqs
  a scalar int32 array. Returns [tokens, num_q_heads, head_dim] in q's dtype. Semantics are those
  of pallas_kernels.ragged_paged_attention.reference.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  del interpret, block_sizes
  return ragged_paged_attention_reference(
      q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
      sliding_window=sliding_window, soft_cap=soft_cap)
