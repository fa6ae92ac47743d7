"""The engine's public types: what a request asks for and what it streams back."""

from __future__ import annotations

import dataclasses
import math

from ferrum_jax.interfaces.errors import FerrumError

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; ranges follow vLLM's. `temperature == 0` is greedy.

    top_k <= 0 disables top-k; top_p == 1 and min_p == 0 disable those filters.
    presence/frequency penalties apply to generated tokens, repetition_penalty to prompt
    and generated tokens (HF/vLLM semantics). `seed` makes sampling reproducible whatever
    else shares the batch. `logprobs`: None, or how many top alternatives (0..20) to return
    beside the sampled token's own logprob.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (disabled) or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise FerrumError.invalid_request(f"{name}={getattr(self, name)!r} {rule}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One streamed delta of a request. The last one has `finished=True`.

    finish_reason: "stop" (eos or a stop token), "length" (max_tokens or the context
    limit), "abort" (cancelled), or "error" (then `error` holds the FerrumError).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...] | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    finished: bool = False
    finish_reason: str | None = None
    stop_token_id: int | None = None
    error: FerrumError | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_num_seqs / max_num_batched_tokens: the per-iteration caps (vLLM's names), at most
    the executor's own limits (None: the executor's); max_waiting: requests queued beyond
    which new ones are refused (resource_exhausted); eos_token_ids: () means the model
    config's; seed: draws the seeds of requests that bring none."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_waiting: int = 256
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0
    # Speculative decoding: draft tokens verified per decoding request and step (0: off;
    # needs a drafter passed to the Engine).
    num_speculative_tokens: int = 0
    # Launch step N+1 before reading step N's tokens (vLLM's async scheduling); its decodes take
    # step N's ids on device. Off: each step's tokens are read before the next is scheduled.
    # Speculative decoding always runs synchronously.
    async_scheduling: bool = True


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV pages in use, 0..1
    num_preemptions: int
    prompt_tokens: int  # totals since start
    generation_tokens: int
    spec_draft_tokens: int = 0  # drafts proposed and verified
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0  # (request, step) pairs that verified drafts
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, and found (vLLM's counters)
    prefix_cache_hits: int = 0
    prefix_cache_pages: int = 0  # pages holding a cached prefix

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify (accepted drafts + the one target token), vLLM's metric."""
        return 1 + self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else 0.0
