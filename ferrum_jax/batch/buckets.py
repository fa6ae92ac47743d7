"""Shape buckets: the bounded, known set of shapes every step is padded to.

tokens T: powers of two from 16 up to `max_num_batched_tokens` (which is itself a bucket);
seqs S: powers of two from 1 up to `max_num_seqs` (likewise), S <= T;
logit rows L: either S (one row per sequence: decode, last chunk) or T (every row: full
prefill logits, speculative verify), so the lm_head never runs over more rows than needed
and the program count stays |T| x |S| x 2 at most.
Decode buckets: a step of at most one token per sequence with fewer than 16 sequences runs at
T = S (shapes (S, S, S) for S = 1, 2, 4, 8), because every GEMM of the step costs by its rows
and a batch-1 decode padded to 16 rows pays ~3x for its weights' traffic on CPU. That adds one
logits and one sampling program per small S, not a T x S grid.
`pages_per_seq` is fixed by the maximum sequence length.
"""

from __future__ import annotations

import dataclasses

from ferrum_jax.interfaces.errors import FerrumError

MIN_TOKEN_BUCKET = 16


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class StepShape:
    tokens: int
    seqs: int
    logit_rows: int


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    max_num_batched_tokens: int
    max_num_seqs: int
    pages_per_seq: int

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise FerrumError.invalid_config(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens < max(MIN_TOKEN_BUCKET, self.max_num_seqs):
            raise FerrumError.invalid_config(
                f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= "
                f"max({MIN_TOKEN_BUCKET}, max_num_seqs={self.max_num_seqs})"
            )

    @property
    def token_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(1, self.max_num_seqs)

    def token_bucket(self, n: int) -> int:
        return _smallest_at_least(self.token_buckets, n, "batched tokens")

    def seq_bucket(self, n: int) -> int:
        return _smallest_at_least(self.seq_buckets, n, "sequences")

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        return tuple(s for s in self.seq_buckets if s < MIN_TOKEN_BUCKET)

    def shape_for(self, num_tokens: int, num_seqs: int, all_rows: bool) -> StepShape:
        s = self.seq_bucket(num_seqs)
        if num_tokens <= s < MIN_TOKEN_BUCKET:
            return StepShape(tokens=s, seqs=s, logit_rows=s)
        t = self.token_bucket(num_tokens)
        s = min(s, t)
        return StepShape(tokens=t, seqs=s, logit_rows=t if all_rows else s)

    def all_shapes(self) -> list[StepShape]:
        shapes = [StepShape(s, s, s) for s in self.decode_buckets]
        for t in self.token_buckets:
            for s in (s for s in self.seq_buckets if s <= t):
                shapes.append(StepShape(t, s, s))
                if t != s:
                    shapes.append(StepShape(t, s, t))
        return shapes


def _smallest_at_least(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise FerrumError.invalid_request(f"{n} {what} in one step exceeds the limit {buckets[-1]}")
