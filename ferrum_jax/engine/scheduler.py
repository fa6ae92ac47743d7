"""Continuous-batching scheduler (vLLM-style, chunked prefill).

Every iteration: running requests first, oldest first — a decoding request takes one
token, a request still in prefill takes the next chunk that fits the token budget — then
waiting requests are admitted FIFO while the budget, the sequence cap and the free pages
allow. A request admitted starts from the longest run of cached KV pages its tokens begin
with (automatic prefix caching, `kv/prefix_cache.py`) and computes only the rest. When a running request needs a page and none is free, the newest running request
is preempted: its pages are freed and it goes back to the front of the queue, keeping
what it generated, to be recomputed later.
"""

from __future__ import annotations

import collections
import dataclasses

from ferrum_jax.engine.request import Request, RequestState


@dataclasses.dataclass
class ScheduledStep:
    work: list[tuple[Request, int]]  # (request, tokens to compute this step)
    preempted: list[Request]


class Scheduler:
    def __init__(self, executor, max_num_seqs: int, max_num_batched_tokens: int, lookahead: int = 0, on_release=None):
        """lookahead: speculative tokens a decoding request may add beyond its one token
        (budget and pages are held for them); on_release(request) runs whenever a request
        gives its pages back (finished, aborted, preempted)."""
        self.executor = executor
        self.lookahead = lookahead
        self.on_release = on_release or (lambda req: None)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        free = self.executor.num_free_pages
        promised = 0  # pages the work so far will take when it launches (still free until then)
        work: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if req.state is not RequestState.RUNNING:
                continue  # preempted earlier in this loop
            if req.ends_with_pending(self.executor.max_sequence_length):
                continue  # its last token is in flight
            if budget == 0 or len(work) == self.max_num_seqs:
                break
            n = min(req.num_uncomputed, budget)
            charge = n
            if req.num_uncomputed == 1:
                room = self.executor.max_sequence_length - req.num_tokens
                charge = min(1 + min(self.lookahead, max(room, 0)), budget)
            need = self.executor.pages_needed(req.handle, charge)
            while need > free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                free = self.executor.num_free_pages - promised
                if victim is req:
                    break
            if req.state is not RequestState.RUNNING:
                continue
            free -= need
            promised += need
            budget -= charge
            req.spec_budget = charge - n
            work.append((req, n))
        while self.waiting and not preempted and budget > 0 and len(work) < self.max_num_seqs:
            req = self.waiting[0]
            prefix = self.executor.match_prefix(req.all_ids, req.cache_salt)
            n = min(req.num_uncomputed - prefix.num_tokens, budget)
            # Cached pages nobody holds are counted free: holding them takes them off.
            need = self.executor.pages_needed(None, prefix.num_tokens + n) - prefix.num_covered + prefix.num_evictable
            if need > free:
                break
            self.waiting.popleft()
            req.handle = self.executor.new_kv_cache(f"req-{req.request_id}", prefix)
            req.num_computed = prefix.num_tokens
            if req.num_cached_tokens is None:
                req.num_cached_tokens = prefix.num_tokens
            req.state = RequestState.RUNNING
            self.running.append(req)
            free -= need
            budget -= n
            work.append((req, n))
        return ScheduledStep(work=work, preempted=preempted)

    def _preempt(self, req: Request) -> None:
        self.executor.release_cache(req.handle.cache_id)
        self.on_release(req)
        req.handle = None
        req.num_computed = 0
        req.state = RequestState.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def remove(self, req: Request) -> None:
        """Drops a finished or aborted request wherever it is, freeing its pages."""
        if req.handle is not None:
            self.executor.release_cache(req.handle.cache_id)
            req.handle = None
        self.on_release(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.state = RequestState.FINISHED
