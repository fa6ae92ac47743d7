"""Checks of the static arguments shared by every ragged paged attention backend.

Shapes are validated once at trace time so that a mismatch fails with a ValueError naming the
offending value and the limit, instead of a shape error deep inside a kernel.
"""


def validate_static_args(q_shape, k_shape, v_shape, kv_lens_shape, page_indices_shape,
                         cu_q_lens_shape, *, sliding_window, soft_cap):
  """Raise ValueError unless the shapes and static options form a valid call."""
  if len(q_shape) != 3:
    raise ValueError(f"q must be [tokens, num_q_heads, head_dim], got shape {q_shape}")
  if len(k_shape) != 4:
    raise ValueError(
        f"k_pages must be [num_kv_heads, num_pages, page_size, head_dim], got shape {k_shape}")
  if tuple(v_shape) != tuple(k_shape):
    raise ValueError(f"v_pages shape {v_shape} must equal k_pages shape {k_shape}")
  _, num_q_heads, head_dim = q_shape
  num_kv_heads, _, _, kv_head_dim = k_shape
  if kv_head_dim != head_dim:
    raise ValueError(f"k_pages head_dim {kv_head_dim} must equal q head_dim {head_dim}")
  if num_kv_heads < 1 or num_q_heads % num_kv_heads:
    raise ValueError(
        f"num_q_heads={num_q_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
  if len(page_indices_shape) != 2:
    raise ValueError(
        f"page_indices must be [seqs, pages_per_seq], got shape {page_indices_shape}")
  num_seqs_max = page_indices_shape[0]
  if tuple(kv_lens_shape) != (num_seqs_max,):
    raise ValueError(f"kv_lens shape {kv_lens_shape} must be ({num_seqs_max},)")
  if tuple(cu_q_lens_shape) != (num_seqs_max + 1,):
    raise ValueError(f"cu_q_lens shape {cu_q_lens_shape} must be ({num_seqs_max + 1},)")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1 or None")
  if soft_cap is not None and not soft_cap > 0:
    raise ValueError(f"soft_cap={soft_cap} must be > 0 or None")
