"""One request's grammar state on the host, and the batch's allowed-token bitmask.

The engine advances a request's matcher with every token it appends and, before each sampler
launch, writes the allowed tokens of every constrained row into one packed bitmask
(`[rows, ceil(vocab / 32)]` int32; -1 rows allow everything) that the jitted sampler applies.
"""

from __future__ import annotations

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from ferrum_jax.step.sampling import bitmask_words

# Computes a batch's masks in parallel threads (it drops the GIL); one per process.
_EXECUTOR: llguidance.LLExecutor | None = None


class RequestGrammar:
    """A request's matcher: `accept` each generated token; `terminated` once the grammar is
    complete (no token can extend it) or broken."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advances past `token_id`; False if the grammar does not allow it (the matcher is
        then in its error state, `error` says why)."""
        return self._matcher.consume_token(token_id)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """The first line of llguidance's error (the rest is a parser state dump)."""
        return self._matcher.get_error().splitlines()[0] if self._matcher.is_error() else None

    def allowed_ids(self, vocab_size: int) -> np.ndarray:
        """The token ids allowed next (for tests and debugging)."""
        mask = fill_bitmasks([(self, 0)], 1, vocab_size)
        return np.nonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab_size])[0]


def fill_bitmasks(rows: list[tuple[RequestGrammar, int]], num_rows: int, vocab_size: int) -> np.ndarray:
    """`[num_rows, bitmask_words(vocab_size)]` int32: row r holds the allowed tokens of the
    grammar paired with r, every other row allows everything."""
    global _EXECUTOR
    out = np.full((num_rows, bitmask_words(vocab_size)), -1, np.int32)
    if rows:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        llg_numpy.fill_next_token_bitmask_par(_EXECUTOR, [(g._matcher, r) for g, r in rows], out)
    return out
