"""The scheduler's page accounting against a hand-sized pool (a stand-in executor that counts
pages the way the real one does: whole pages per sequence, freed on release)."""

from __future__ import annotations

from ferrum_jax.engine.request import Request, RequestState
from ferrum_jax.engine.scheduler import Scheduler
from ferrum_jax.engine.types import SamplingParams

PAGE = 4


class _Handle:
    def __init__(self, cache_id: str, tokens: int):
        self.cache_id, self.num_tokens = cache_id, tokens


class _Pool:
    """num_free_pages, pages_needed and release_cache over whole pages of PAGE tokens."""

    max_sequence_length = 64

    def __init__(self, total: int):
        self.total, self.seqs = total, {}

    @property
    def num_free_pages(self) -> int:
        return self.total - sum(-(-h.num_tokens // PAGE) for h in self.seqs.values())

    def pages_needed(self, handle, new_tokens: int) -> int:
        return -(-(handle.num_tokens + new_tokens) // PAGE) - -(-handle.num_tokens // PAGE)

    def release_cache(self, cache_id: str) -> None:
        del self.seqs[cache_id]


def _running(pool: _Pool, name: str, prompt: int, computed: int) -> Request:
    req = Request(name, list(range(prompt)), SamplingParams(max_tokens=4), seed=0)
    req.handle = pool.seqs[name] = _Handle(name, computed)
    req.num_computed, req.state = computed, RequestState.RUNNING
    return req


def test_preempting_for_a_later_request_keeps_the_pages_promised_to_an_earlier_one():
    """Five pages: A (8 tokens, decoding its 9th) holds 2, B (4 of 12 prompt tokens) 1, C (4,
    decoding) 1; one is free. A takes it. B's 8-token chunk needs 2: C is preempted, which frees
    1 page -- 2 free, but one is A's. Counting both for B over-commits the pool (the server's
    32-stream test died on "KV cache exhausted: 4 pages needed, 3 of 39 free"); B must be
    preempted too, and the step is A alone."""
    pool = _Pool(total=5)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=32)
    a, b, c = _running(pool, "a", 9, 8), _running(pool, "b", 12, 4), _running(pool, "c", 5, 4)
    scheduler.running = [a, b, c]
    step = scheduler.schedule()
    assert step.work == [(a, 1)] and step.preempted == [c, b]
    assert sum(pool.pages_needed(r.handle, n) for r, n in step.work) <= pool.num_free_pages
