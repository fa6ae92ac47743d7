"""Drafters propose the next k tokens of each running request for speculative decoding.

`propose` returns, per request, the draft tokens and the distributions they were drawn
from (`[len, vocab]`, or None for a deterministic drafter whose drafts are point masses),
so the rejection sampler can keep the output distribution exactly the target's.
`accepted` tells the drafter how many of its drafts survived so it can resync its state.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from ferrum_jax.engine.request import Request


@dataclasses.dataclass(frozen=True)
class Drafts:
    tokens: list[int]
    probs: np.ndarray | None  # [len(tokens), vocab] the draws' distributions; None: point masses


class Drafter(abc.ABC):
    @abc.abstractmethod
    def propose(self, requests: list[Request], num_tokens: list[int], sampling_row) -> list[Drafts]:
        """Up to num_tokens[i] drafts for requests[i] (fewer, or none, is fine).

        sampling_row(request, extra_tokens) -> SamplingRow: the engine's sampling settings
        for the position after request.all_ids + extra_tokens, for drafters that sample."""

    def accepted(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        """Called after verification, before the accepted tokens are appended."""

    def release(self, request: Request) -> None:
        """The request left the engine (finished, aborted or preempted)."""

    def allow_rollback(self, tokens: int) -> None:
        """The engine verifies up to `tokens` at a time: a drafter that keeps KV truncates that
        much of it (see JaxModelExecutor.allow_rollback)."""


class NgramDrafter(Drafter):
    """Prompt lookup: find the longest recent n-gram (max_n down to min_n) that occurred
    earlier in the request's own tokens and propose what followed its latest occurrence."""

    def __init__(self, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes min_n={min_n}, max_n={max_n}: need 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, requests: list[Request], num_tokens: list[int], sampling_row) -> list[Drafts]:
        return [Drafts(self._lookup(np.asarray(r.all_ids), k), None) for r, k in zip(requests, num_tokens)]

    def _lookup(self, ids: np.ndarray, k: int) -> list[int]:
        n_ids = len(ids)
        if k <= 0:
            return []
        for n in range(min(self.max_n, n_ids - 1), self.min_n - 1, -1):
            tail = ids[n_ids - n :]
            windows = np.lib.stride_tricks.sliding_window_view(ids[: n_ids - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = hits[-1] + n
                return ids[start : start + k].tolist()
        return []
