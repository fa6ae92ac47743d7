"""Shape buckets: the bounded, known set of shapes every step is padded to.

tokens T: powers of two from 16 up to `max_num_batched_tokens` (which is itself a bucket);
seqs S: powers of two from 1 up to `max_num_seqs` (likewise) for decode steps (below);
for a T-token step powers of FOUR from 1 below min(T, max_num_seqs), then that cap. S only
sizes the per-sequence metadata and the logit rows (the lm_head and sampler cost by row), so
padding 5 sequences to 16 costs a few lm_head rows next to T tokens of layers, while every
bucket is a program to compile at start-up: powers of four keep 4 S buckets per T at the
default 32 sequences instead of 6;
logit rows L: either S (one row per sequence: decode, last chunk) or T (every row: full
prefill logits, speculative verify), so the lm_head never runs over more rows than needed
and the program count stays |T| x |S| x 2 at most.
Decode buckets: a step of at most one token per sequence with fewer than 16 sequences runs at
T = S (shapes (S, S, S) for S = 1, 2, 4, 8), because every GEMM of the step costs by its rows
and a batch-1 decode padded to 16 rows pays ~3x for its weights' traffic on CPU. That adds one
logits and one sampling program per small S, not a T x S grid.
`pages_per_seq` is fixed by the maximum sequence length, `kv_groups` (the page tables per
sequence, kv.layout) by the model.
"""

from __future__ import annotations

import dataclasses

from ferrum_jax.interfaces.errors import FerrumError

MIN_TOKEN_BUCKET = 16


def _powers(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo * factor, ... below hi, then hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
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
    kv_groups: int = 1

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
        return _powers(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        return _powers(1, self.max_num_seqs)

    def token_bucket(self, n: int) -> int:
        return _smallest_at_least(self.token_buckets, n, "batched tokens")

    def seq_bucket(self, n: int) -> int:
        return _smallest_at_least(self.seq_buckets, n, "sequences")

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        return tuple(s for s in self.seq_buckets if s < MIN_TOKEN_BUCKET)

    def step_seq_buckets(self, tokens: int) -> tuple[int, ...]:
        """Sequence buckets of a step padded to `tokens` (a token bucket)."""
        return _powers(1, min(tokens, self.max_num_seqs), factor=4)

    def shape_for(self, num_tokens: int, num_seqs: int, all_rows: bool) -> StepShape:
        s = self.seq_bucket(num_seqs)
        if num_tokens <= s < MIN_TOKEN_BUCKET:
            return StepShape(tokens=s, seqs=s, logit_rows=s)
        t = self.token_bucket(num_tokens)
        s = _smallest_at_least(self.step_seq_buckets(t), num_seqs, "sequences")
        return StepShape(tokens=t, seqs=s, logit_rows=t if all_rows else s)

    def shapes(self, all_rows: bool) -> list[StepShape]:
        """Every shape `shape_for(..., all_rows)` can return."""
        shapes = [StepShape(s, s, s) for s in self.decode_buckets]
        for t in self.token_buckets:
            shapes += [StepShape(t, s, t if all_rows else s) for s in self.step_seq_buckets(t)]
        return shapes

    @property
    def row_buckets(self) -> tuple[int, ...]:
        """Logit-row counts of the one-row-per-sequence shapes: one sampler program each."""
        return tuple(sorted({s.logit_rows for s in self.shapes(all_rows=False)}))

    def all_shapes(self) -> list[StepShape]:
        return list(dict.fromkeys(self.shapes(False) + self.shapes(True)))


def _smallest_at_least(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise FerrumError.invalid_request(f"{n} {what} in one step exceeds the limit {buckets[-1]}")
