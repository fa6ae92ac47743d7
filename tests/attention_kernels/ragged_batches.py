"""Random ragged paged-attention batches and a naive numpy oracle for the kernel tests."""

import dataclasses

import numpy as np
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Batch:
  q: jnp.ndarray             # [tokens, num_q_heads, head_dim]
  k_pages: jnp.ndarray       # [num_kv_heads, num_pages, page_size, head_dim]
  v_pages: jnp.ndarray       # [num_kv_heads, num_pages, page_size, head_dim]
  kv_lens: jnp.ndarray       # [seqs]
  page_indices: jnp.ndarray  # [seqs, pages_per_seq]
  cu_q_lens: jnp.ndarray     # [seqs + 1]
  num_seqs: jnp.ndarray      # scalar

  @property
  def args(self):
    return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_indices, self.cu_q_lens,
            self.num_seqs)

  @property
  def num_valid_tokens(self):
    return int(self.cu_q_lens[int(self.num_seqs)])


def make_batch(rng, lens, *, num_tokens, num_seqs_max, page_size, pages_per_seq, num_q_heads,
               num_kv_heads, head_dim, dtype):
  """Build a batch from (q_len, kv_len) pairs, one per live sequence.

  Pages are handed out from a shuffled pool so page tables are non-contiguous; table entries
  past a sequence's length and rows of padding sequences hold random in-range page ids, which
  the contract allows, so kernels that wrongly read them produce wrong answers. The cache always
  holds num_seqs_max * pages_per_seq pages, so every batch of one config has the same shapes and
  reuses one compilation.
  """
  num_live = len(lens)
  assert num_live <= num_seqs_max
  q_lens = np.array([ql for ql, _ in lens], np.int32)
  kv_lens = np.array([kl for _, kl in lens], np.int32)
  assert np.all(q_lens <= kv_lens) and q_lens.sum() <= num_tokens
  assert np.all(kv_lens <= pages_per_seq * page_size)
  used_pages = -(-kv_lens // page_size)
  num_pages = num_seqs_max * pages_per_seq
  pool = rng.permutation(num_pages)
  page_indices = rng.integers(0, num_pages, (num_seqs_max, pages_per_seq)).astype(np.int32)
  offset = 0
  for s, n in enumerate(used_pages):
    page_indices[s, :n] = pool[offset:offset + n]
    offset += n
  cu_q_lens = np.full(num_seqs_max + 1, q_lens.sum(), np.int32)
  cu_q_lens[:num_live + 1] = np.concatenate([[0], np.cumsum(q_lens)])
  kv_lens_all = np.zeros(num_seqs_max, np.int32)
  kv_lens_all[:num_live] = kv_lens

  def normal(shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  return Batch(
      q=normal((num_tokens, num_q_heads, head_dim)),
      k_pages=normal((num_kv_heads, num_pages, page_size, head_dim)),
      v_pages=normal((num_kv_heads, num_pages, page_size, head_dim)),
      kv_lens=jnp.asarray(kv_lens_all),
      page_indices=jnp.asarray(page_indices),
      cu_q_lens=jnp.asarray(cu_q_lens),
      num_seqs=jnp.asarray(num_live, jnp.int32))


def naive_attention(batch, *, sm_scale, sliding_window=None, soft_cap=None):
  """Per-sequence float64 loop straight from the contract; returns [tokens, heads, head_dim]."""
  q = np.asarray(batch.q, np.float64)
  k_pages = np.asarray(batch.k_pages, np.float64)
  v_pages = np.asarray(batch.v_pages, np.float64)
  kv_lens = np.asarray(batch.kv_lens)
  page_indices = np.asarray(batch.page_indices)
  cu_q_lens = np.asarray(batch.cu_q_lens)
  num_tokens, num_q_heads, _ = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  out = np.zeros_like(q)
  for s in range(int(batch.num_seqs)):
    q_start, q_end, kv_len = cu_q_lens[s], cu_q_lens[s + 1], kv_lens[s]
    positions = np.arange(kv_len)
    pages = page_indices[s, positions // page_size]
    k = k_pages[:, pages, positions % page_size]  # [kv_heads, kv_len, head_dim]
    v = v_pages[:, pages, positions % page_size]
    for j, t in enumerate(range(q_start, q_end)):
      pos = kv_len - (q_end - q_start) + j
      allowed = positions <= pos
      if sliding_window is not None:
        allowed &= positions > pos - sliding_window
      for h in range(num_q_heads):
        scores = sm_scale * (k[h // group] @ q[t, h])
        if soft_cap is not None:
          scores = soft_cap * np.tanh(scores / soft_cap)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max())
        out[t, h] = (p / p.sum()) @ v[h // group]
  return out
