"""A request's life inside the engine: its tokens, its KV handle, its output queue."""

from __future__ import annotations

import asyncio
import dataclasses
import enum

from ferrum_jax.engine.types import RequestOutput, SamplingParams
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.structured.matcher import RequestGrammar


# Stands for a pending token on the host; the step that computes it takes the real id on device.
PENDING_ID = 0


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    handle: KvCacheHandle | None = None
    # Tokens of prompt + output whose K/V are in the cache. After a preemption it drops to
    # 0 and the request is recomputed from prompt + the output it already produced.
    num_computed: int = 0
    state: RequestState = RequestState.WAITING
    # Speculative tokens the scheduler held budget and pages for in this iteration.
    spec_budget: int = 0
    # Tokens sampled by a step in flight and not read yet (async scheduling): counted in
    # num_tokens, so the next step can already compute them, fed their ids on device.
    pending: int = 0
    aborted: bool = False
    # Prefix-cache key extra (vLLM's cache_salt): requests share cached KV only with equal salts.
    cache_salt: str | None = None
    # Prompt tokens found in the prefix cache when first scheduled (usage's cached_tokens).
    num_cached_tokens: int | None = None
    # Structured outputs: the grammar every output token must follow (advanced as tokens are appended).
    grammar: RequestGrammar | None = None
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, stop: int) -> list[int]:
        """`all_ids[start:stop]` without building `all_ids`: a decode step reads one token of
        a context that may be thousands long, and the step's host work should not grow with it.
        Pending tokens read as PENDING_ID."""
        stop_known = len(self.prompt_ids) + len(self.output_ids)
        if stop > stop_known:
            return self.ids(start, stop_known) + [PENDING_ID] * (stop - max(start, stop_known))
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : stop - n]
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def last_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    def ends_with_pending(self, max_sequence_length: int) -> bool:
        """Whether the pending tokens already end it by length: no step should compute past them."""
        return self.pending > 0 and (
            len(self.output_ids) + self.pending >= self.params.max_tokens or self.num_tokens >= max_sequence_length
        )

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def emit(self, out: RequestOutput) -> None:
        self.queue.put_nowait(out)
