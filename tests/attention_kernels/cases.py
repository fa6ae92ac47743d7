"""Named ragged-batch scenarios shared by the reference and kernel tests.

Each case is (lens, config): lens lists (q_len, kv_len) per live sequence; config overrides
DEFAULT_CONFIG. Shapes are tiny because the TPU interpreter costs milliseconds per grid point,
and configs are few because every distinct config (or static option) is a fresh compilation.
"""

DEFAULT_CONFIG = dict(num_tokens=32, num_seqs_max=6, page_size=8, pages_per_seq=6,
                      num_q_heads=4, num_kv_heads=2, head_dim=64, dtype="float32")

CONFIGS = {
    "gqa_1": dict(num_q_heads=2, num_kv_heads=2),
    "gqa_4_head_dim_128": dict(num_q_heads=4, num_kv_heads=1, head_dim=128),
    "gqa_8_bfloat16": dict(num_q_heads=8, num_kv_heads=1, dtype="bfloat16"),
    "bfloat16_head_dim_128": dict(head_dim=128, dtype="bfloat16"),
}

MIXED = [(1, 30), (11, 19), (1, 5), (6, 6)]

CASES = {
    "decode_only": ([(1, 17), (1, 8), (1, 1), (1, 40), (1, 48), (1, 9)], {}),
    "prefill_only": ([(12, 12), (9, 9), (5, 5)], {}),
    "mixed": (MIXED, {}),
    "q_longer_than_page": ([(20, 29), (3, 3)], {}),
    "kv_exact_page_multiple": ([(8, 16), (1, 24), (16, 16)], {}),
    "length_one_sequences": ([(1, 1), (1, 1), (1, 1)], {}),
    "zero_length_padding_inside": ([(3, 10), (0, 0), (4, 9), (0, 0)], {}),
    "no_live_sequences": ([], {}),
    "full_bucket": ([(16, 48), (16, 20)], {}),
    **{name: (MIXED, config) for name, config in CONFIGS.items()},
}

OPTIONS = {
    "sliding_window": dict(sliding_window=5),
    "sliding_window_soft_cap": dict(sliding_window=13, soft_cap=1.5),
}


def random_lens(rng, *, num_tokens, num_seqs_max, page_size, pages_per_seq, **_):
  """Random (q_len, kv_len) pairs that fit the config: a mix of decode and prefill rows."""
  lens, budget = [], num_tokens
  for _ in range(int(rng.integers(1, num_seqs_max + 1))):
    kv_len = int(rng.integers(1, pages_per_seq * page_size + 1))
    q_len = 1 if rng.random() < 0.5 else int(rng.integers(1, kv_len + 1))
    q_len = min(q_len, budget)
    if q_len == 0:
      break
    lens.append((q_len, kv_len))
    budget -= q_len
  return lens
