"""The executor traits: `ModelExecutor`, `BatchModelExecutor`, `SpeculativeExecutor`,
`ModelExecutorFactory`.

An executor does tensor work only (no tokenisation, no sampling), split into prefill
(the prompt) and decode (one token per step). The Rust trait is `async`, so every I/O
method here is a coroutine; the engine awaits them from its scheduling loop.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from ferrum_jax.interfaces.capabilities import ExecutorCapabilities
from ferrum_jax.interfaces.config import ExecutorConfig, ExecutorType
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.inputs import (
    DecodeInput,
    DecodeOutput,
    PrefillInput,
    PrefillOutput,
    SpeculativeDecodeOutput,
    UnifiedBatch,
)
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.interfaces.status import ExecutorStatus
from ferrum_jax.interfaces.tensor_ref import TensorRef
from ferrum_jax.interfaces.types import ModelInfo


class ModelExecutor(abc.ABC):
    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Model information and metadata."""

    @abc.abstractmethod
    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        """Process a prompt: `input_ids` `[batch, seq]` -> logits `[batch, seq, vocab]`."""

    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """Prefill several prompts, ideally in one forward pass.

        This default runs `prefill()` once per input, serially. Executors with a batched
        (varlen) forward should override it: a cohort of new prompts then shares one
        launch instead of paying per-request kernel overhead.
        """
        return [await self.prefill(item) for item in inputs]

    @abc.abstractmethod
    async def decode(self, input: DecodeInput) -> DecodeOutput:
        """One step: `input_ids` `[batch, 1]` -> logits `[batch, vocab]`."""

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """Decode several sequences; this default calls `decode()` once per input."""
        return [await self.decode(item) for item in inputs]

    async def unified_decode(self, batch: UnifiedBatch) -> list[TensorRef | None]:
        """One forward over a mix of prefill chunks and decode steps.

        Returns one entry per `batch.items[i]`: a `[vocab]` float32 logits row for items
        with `is_final_chunk`, None for intermediate prefill chunks (which only update KV
        state). Unsupported by default; executors override either with a fallback that
        dispatches chunks to `prefill()` and decode items to `batch_decode()`, or with a
        real `[M_total, hidden]` forward using a varlen attention kernel.
        """
        raise FerrumError.unsupported("unified_decode not implemented for this executor")

    async def forward(self, input: TensorRef) -> TensorRef:
        """Full forward pass for non-autoregressive use; unsupported by default."""
        raise FerrumError.unsupported("Full forward pass not supported by this executor")

    async def truncate_kv(self, kv_cache: KvCacheHandle, new_len: int) -> None:
        """Roll the sequence's KV cache back to `new_len` tokens.

        Speculative decoding calls this after a partial rejection so the next step sees a
        KV prefix matching the accepted tokens. The default does nothing, which is correct
        for executors that keep no per-sequence state; real executors override it.
        """

    async def forward_verify(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """Verify N+1 positions, returning one `DecodeOutput` per input.

        Meant to be one forward over all positions for speculative decoding's target model;
        this default makes `len(inputs)` sequential `decode()` calls, which is correct but
        slow. The last output carries the final KV handle.
        """
        return [await self.decode(item) for item in inputs]

    @abc.abstractmethod
    def capabilities(self) -> ExecutorCapabilities:
        """What this executor supports and its memory needs."""

    @abc.abstractmethod
    def status(self) -> ExecutorStatus:
        """Current state snapshot."""

    async def warmup(self) -> None:
        """Load the model, allocate memory, compile; nothing to do by default."""

    async def shutdown(self) -> None:
        """Release resources gracefully; nothing to do by default."""

    def release_cache(self, cache_id: str) -> None:
        """Free the KV cache and state of a finished sequence.

        The engine calls this when a request ends, successfully or not; `cache_id` is the
        one on the `KvCacheHandle` that prefill/decode returned. Executors that keep
        per-sequence caches override it; the default holds nothing to free.
        """


class BatchModelExecutor(ModelExecutor):
    """An executor that runs many sequences per forward and can size its batches."""

    @abc.abstractmethod
    def optimal_batch_size(self) -> int:
        """Best batch size under current conditions."""

    @abc.abstractmethod
    def supports_batch_size(self, batch_size: int) -> bool:
        """Whether `batch_size` can be run."""


class SpeculativeExecutor(ModelExecutor):
    @abc.abstractmethod
    async def speculative_decode(
        self,
        input: DecodeInput,
        draft_tokens: Sequence[int],
        acceptance_threshold: float,
    ) -> SpeculativeDecodeOutput:
        """Verify `draft_tokens` from a draft model, accepting a prefix of them."""


class ModelExecutorFactory(abc.ABC):
    @abc.abstractmethod
    async def create_executor(self, config: ExecutorConfig) -> ModelExecutor:
        """Build an executor for `config`."""

    @abc.abstractmethod
    async def create_batch_executor(self, config: ExecutorConfig) -> BatchModelExecutor:
        """Build a batch executor for `config`."""

    @abc.abstractmethod
    def supported_types(self) -> list[ExecutorType]:
        """Executor types this factory can build."""

    @abc.abstractmethod
    def validate_config(self, config: ExecutorConfig) -> None:
        """Raise `FerrumError` (invalid_config) if `config` cannot be built."""
