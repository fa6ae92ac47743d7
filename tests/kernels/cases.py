"""Named ragged-batch scenarios shared by the reference and kernel tests.

Each case is (lens, config): lens lists (q_len, kv_len) per live sequence; config overrides
DEFAULT_CONFIG. Shapes are tiny because the TPU interpreter costs milliseconds per grid point.
"""

DEFAULT_CONFIG = dict(num_tokens=32, num_seqs_max=6, page_size=8, pages_per_seq=6,
                      num_q_heads=4, num_kv_heads=2, head_dim=64, dtype="float32")

CASES = {
    "decode_only": ([(1, 17), (1, 8), (1, 1), (1, 40)], {}),
    "prefill_only": ([(12, 12), (9, 9), (5, 5)], {}),
    "mixed": ([(1, 30), (11, 19), (1, 5), (6, 6)], {}),
    "q_longer_than_page": ([(20, 29), (3, 3)], {}),
    "kv_exact_page_multiple": ([(8, 16), (1, 24), (16, 16)], {}),
    "length_one_sequences": ([(1, 1), (1, 1), (1, 1)], {}),
    "zero_length_padding_inside": ([(3, 10), (0, 0), (4, 9), (0, 0)], {}),
    "no_live_sequences": ([], {}),
    "gqa_1": ([(1, 21), (7, 13)], dict(num_q_heads=2, num_kv_heads=2)),
    "gqa_8": ([(1, 21), (7, 13)], dict(num_q_heads=8, num_kv_heads=1)),
    "head_dim_128": ([(1, 21), (7, 13)], dict(head_dim=128)),
    "bfloat16": ([(1, 30), (11, 19), (4, 4)], dict(dtype="bfloat16")),
}
