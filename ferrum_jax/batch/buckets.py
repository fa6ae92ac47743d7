"""Shape buckets: the bounded, known set of shapes every step is padded to.

tokens T: powers of two from 16 up to `max_num_batched_tokens` (which is itself a bucket);
seqs S of a T-token step: powers of FOUR from 1 below min(T, max_num_seqs), then that cap. S
only sizes the per-sequence metadata and the logit rows (the lm_head and sampler cost by row);
logit rows L: either S (one row per sequence: decode, last chunk) or T (every row: full
prefill logits, speculative verify), so the lm_head never runs over more rows than needed.
Decode buckets: a step of at most one token per sequence with fewer than 16 sequences may run
at T = S (shapes (S, S, S) for S = 1, 2, 4, 8), because on a CPU every GEMM of the step costs by
its rows and a batch-1 decode padded to 16 rows pays ~3x for its weights' traffic.

Every bucket is a program to compile at start-up, so a smaller S or decode bucket exists only
where it pays: where the step's cost model (batch.step_cost) says the next larger bucket would
cost over 2% more. On a CPU that keeps the decode buckets and most S buckets (padding rows cost
their lm_head FLOPs); on a TPU or GPU below the ridge a step is a weight stream whatever its
rows, so Llama-3-8B keeps one S per T and no decode bucket (padding a 1-token decode to 16
rows costs nothing there); every-row steps never need more than one S.
`pages_per_seq` is fixed by the maximum sequence length, `kv_groups` (the page tables per
sequence, kv.layout) by the model.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

from ferrum_jax.batch.step_cost import StepCost
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
    cost: StepCost
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

    @functools.cached_property
    def decode_buckets(self) -> tuple[int, ...]:
        kept: list[int] = []
        for s in reversed([s for s in self.seq_buckets if s < MIN_TOKEN_BUCKET]):
            larger = self._decode_shape(s, kept) if kept else self._step_shape(MIN_TOKEN_BUCKET, s, False)
            if self.cost.pays((s, s), (larger.tokens, larger.logit_rows)):
                kept.insert(0, s)
        return tuple(kept)

    def step_seq_buckets(self, tokens: int, all_rows: bool) -> tuple[int, ...]:
        """Sequence buckets of a step padded to `tokens` (a token bucket)."""
        return self._step_seq_buckets[tokens, all_rows]

    @functools.cached_property
    def _step_seq_buckets(self) -> dict[tuple[int, bool], tuple[int, ...]]:
        out = {}
        for tokens, all_rows in itertools.product(self.token_buckets, (False, True)):
            kept = [min(tokens, self.max_num_seqs)]
            for s in reversed(_powers(1, kept[0], factor=4)[:-1]):
                if not all_rows and self.cost.pays((tokens, s), (tokens, kept[0])):
                    kept.insert(0, s)
            out[tokens, all_rows] = tuple(kept)
        return out

    def shape_for(self, num_tokens: int, num_seqs: int, all_rows: bool) -> StepShape:
        if num_seqs > self.max_num_seqs:
            raise FerrumError.invalid_request(f"{num_seqs} sequences in one step exceeds the limit {self.max_num_seqs}")
        decode = [d for d in self.decode_buckets if d >= num_seqs]
        if decode and num_tokens <= decode[0]:
            return StepShape(decode[0], decode[0], decode[0])
        return self._step_shape(self.token_bucket(num_tokens), num_seqs, all_rows)

    def _step_shape(self, tokens: int, num_seqs: int, all_rows: bool) -> StepShape:
        s = _smallest_at_least(self.step_seq_buckets(tokens, all_rows), num_seqs, "sequences")
        return StepShape(tokens=tokens, seqs=s, logit_rows=tokens if all_rows else s)

    @staticmethod
    def _decode_shape(num_seqs: int, decode_buckets: list[int]) -> StepShape:
        d = _smallest_at_least(tuple(decode_buckets), num_seqs, "sequences")
        return StepShape(d, d, d)

    def shapes(self, all_rows: bool) -> list[StepShape]:
        """Every shape `shape_for(..., all_rows)` can return."""
        shapes = [StepShape(s, s, s) for s in self.decode_buckets]
        for t in self.token_buckets:
            shapes += [self._step_shape(t, s, all_rows) for s in self.step_seq_buckets(t, all_rows)]
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
