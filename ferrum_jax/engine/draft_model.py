"""A draft model as drafter: a second JaxModelExecutor (same tokenizer) whose KV is kept
in step with each request and truncated to the accepted prefix after verification.

Drafts are drawn from the draft model's own sampling distribution under the request's
settings (greedy requests: its argmax), and those distributions are returned for the
rejection sampler.
"""

from __future__ import annotations

import numpy as np

from ferrum_jax.engine.drafter import Drafter, Drafts
from ferrum_jax.engine.request import Request
from ferrum_jax.interfaces.errors import FerrumError


class DraftModelDrafter(Drafter):
    def __init__(self, draft_executor, target_vocab_size: int):
        if draft_executor.cfg.vocab_size != target_vocab_size:
            raise FerrumError.invalid_config(
                f"draft model vocab_size={draft_executor.cfg.vocab_size} differs from the target's {target_vocab_size}"
            )
        self.ex = draft_executor
        self._handles: dict[str, object] = {}

    def allow_rollback(self, tokens: int) -> None:
        self.ex.allow_rollback(tokens)

    def propose(self, requests: list[Request], num_tokens: list[int], sampling_row) -> list[Drafts]:
        active = [(r, k) for r, k in zip(requests, num_tokens) if k > 0]
        drafted: dict[str, list[int]] = {r.request_id: [] for r, _ in active}
        probs: dict[str, list[np.ndarray]] = {r.request_id: [] for r, _ in active}
        feed = []
        for r, _ in active:
            h = self._handles.get(r.request_id)
            if h is None:
                h = self._handles[r.request_id] = self.ex.new_kv_cache(f"draft-{r.request_id}")
            feed.append((h, r.ids(h.num_tokens, r.num_tokens)))
        step = 0
        while active:
            logits = self.ex.extend(feed, "last")
            rows = [sampling_row(r, drafted[r.request_id]) for r, _ in active]
            dist = self.ex.distribution(np.concatenate(logits), rows)
            still, feed = [], []
            for (r, k), p in zip(active, dist):
                rng = np.random.default_rng([r.seed, len(r.output_ids), step, 0xD])
                token = int(rng.choice(len(p), p=p / p.sum()))
                drafted[r.request_id].append(token)
                probs[r.request_id].append(p)
                if len(drafted[r.request_id]) < k:
                    still.append((r, k))
                    feed.append((self._handles[r.request_id], [token]))
            active = still
            step += 1
        return [
            Drafts(drafted.get(r.request_id, []), np.stack(probs[r.request_id]) if probs.get(r.request_id) else None)
            for r in requests
        ]

    def accepted(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        h = self._handles.get(request.request_id)
        if h is not None:
            # The draft KV holds the request's tokens plus its first num_drafted-1 drafts;
            # keep the part the target accepted.
            keep = min(h.num_tokens, request.num_tokens + num_accepted)
            self.ex.truncate(h, keep)

    def release(self, request: Request) -> None:
        h = self._handles.pop(request.request_id, None)
        if h is not None:
            self.ex.release_cache(h.cache_id)
