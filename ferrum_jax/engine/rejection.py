"""Exact speculative-sampling acceptance (Leviathan et al. / Chen et al.).

Draft token d_j, drawn from the draft distribution q_j, is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection the replacement is drawn from the
normalised positive part of p_j - q_j; if every draft is accepted a bonus token is drawn
from p_k. The emitted tokens are then distributed exactly as target sampling would be.
A deterministic drafter (n-gram lookup) is the point mass q_j = onehot(d_j). With
one-hot (greedy) target rows this reduces to: accept while the draft equals the argmax,
then emit the argmax.
"""

from __future__ import annotations

import numpy as np


def accept_drafts(
    p_rows: np.ndarray, drafts: list[int], q_rows: np.ndarray | None, rng: np.random.Generator
) -> tuple[int, int]:
    """p_rows `[k+1, vocab]` target distributions; q_rows `[k, vocab]` draft distributions
    (None: point masses on the drafts). Returns (number accepted, the next token)."""
    vocab = p_rows.shape[1]
    for j, d in enumerate(drafts):
        p = p_rows[j].astype(np.float64)
        if q_rows is None:
            q = np.zeros(vocab)
            q[d] = 1.0
        else:
            q = q_rows[j].astype(np.float64)
        if q[d] <= 0 or rng.random() * q[d] >= p[d]:
            residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            # p == q exactly leaves no residual mass; then p itself is the right law.
            dist = residual / total if total > 0 else p / p.sum()
            return j, int(rng.choice(vocab, p=dist))
    last = p_rows[len(drafts)].astype(np.float64)
    return len(drafts), int(rng.choice(vocab, p=last / last.sum()))
