"""Inputs and outputs of the executor phases: prefill, decode, unified batch, speculative.

Ports of the seed's `PrefillInput`/`PrefillOutput`, `DecodeInput`/`DecodeOutput`,
`UnifiedBatchItem`/`UnifiedBatch` and `SpeculativeDecodeOutput`. Tensors are
`TensorRef`s (numpy or jax arrays); shapes are read with `np.shape`, which uses the
array's own `.shape` and so never copies a jax array to the host.

The tensor-holding dataclasses use `eq=False`: a generated `__eq__` would compare arrays
elementwise and then fail on `bool(array)`, so identity equality is the only safe one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.interfaces.tensor_ref import TensorRef


def _batch_dim(input_ids: TensorRef) -> int:
    shape = np.shape(input_ids)
    if len(shape) == 0:
        raise FerrumError.invalid_request(
            f"input_ids must have at least 1 dimension [batch, ...], got shape {shape}"
        )
    return int(shape[0])


@dataclasses.dataclass(eq=False)
class PrefillInput:
    """Prompt-processing input.

    `input_ids`: `[batch, seq]` token ids. `attention_mask`, `position_ids` (for RoPE):
    `[batch, seq]`. `kv_cache`: a pre-allocated handle for paged attention, or None to let
    the executor allocate one.
    """

    input_ids: TensorRef
    attention_mask: TensorRef | None = None
    position_ids: TensorRef | None = None
    kv_cache: KvCacheHandle | None = None

    def with_kv_cache(self, kv_cache: KvCacheHandle) -> "PrefillInput":
        return dataclasses.replace(self, kv_cache=kv_cache)

    def with_attention_mask(self, mask: TensorRef) -> "PrefillInput":
        return dataclasses.replace(self, attention_mask=mask)

    def with_position_ids(self, positions: TensorRef) -> "PrefillInput":
        return dataclasses.replace(self, position_ids=positions)

    def batch_size(self) -> int:
        return _batch_dim(self.input_ids)

    def sequence_length(self) -> int:
        """`shape[1]` of `input_ids`; a 1-D `[batch]` input counts as one token per row."""
        shape = np.shape(self.input_ids)
        return int(shape[1]) if len(shape) >= 2 else 1


@dataclasses.dataclass(eq=False)
class PrefillOutput:
    """Prefill result.

    `logits`: `[batch, seq, vocab]`. `kv_cache`: the handle now holding the prompt's
    states. `hidden_states` (per layer, `[batch, seq, hidden]`) and `attention_weights` are
    optional analysis outputs.
    """

    logits: TensorRef
    kv_cache: KvCacheHandle
    hidden_states: list[TensorRef] | None = None
    attention_weights: list[TensorRef] | None = None

    def last_token_logits(self) -> TensorRef:
        """Logits of the last position, `[batch, seq, vocab]` -> `[batch, vocab]`."""
        shape = np.shape(self.logits)
        if len(shape) != 3:
            raise FerrumError.backend(
                f"Expected 3D logits tensor [batch, seq, vocab], got shape {shape}"
            )
        if shape[1] == 0:
            raise FerrumError.backend(f"Empty sequence: logits shape {shape} has seq == 0")
        return self.logits[:, -1, :]


@dataclasses.dataclass(eq=False)
class DecodeInput:
    """One decode step: `input_ids` `[batch, 1]`, the cache from earlier steps, and
    optional `position_ids` `[batch, 1]`."""

    input_ids: TensorRef
    kv_cache: KvCacheHandle
    position_ids: TensorRef | None = None

    def with_position_ids(self, positions: TensorRef) -> "DecodeInput":
        return dataclasses.replace(self, position_ids=positions)

    def batch_size(self) -> int:
        return _batch_dim(self.input_ids)


@dataclasses.dataclass(eq=False)
class DecodeOutput:
    """Decode result: `logits` `[batch, vocab]`, the updated cache, and optional
    `hidden_state` `[batch, hidden]` / per-layer `attention_weights`."""

    logits: TensorRef
    kv_cache: KvCacheHandle
    hidden_state: TensorRef | None = None
    attention_weights: list[TensorRef] | None = None


@dataclasses.dataclass(repr=False)
class UnifiedBatchItem:
    """One sequence's share of a unified mixed-batch forward.

    A prefill chunk (`len(q_tokens) >= 1`, `pos_offset > 0` when continuing a chunked
    prefill) and a decode step (`len(q_tokens) == 1`, `pos_offset` = current cache length)
    can sit in the same batch: the model concatenates every item's `q_tokens` into one
    `[M_total, hidden]` activation, runs the GEMMs and norms once, and only the attention
    kernel sees per-item segmentation.

    `pos_offset` is the absolute position of `q_tokens[0]`. `is_final_chunk` is true iff
    this item finishes the request's prefill or is a decode step, i.e. its last token's
    logits are wanted for sampling; intermediate chunks set it false to skip the lm_head.
    """

    seq_id: str
    q_tokens: list[int]
    kv_cache: KvCacheHandle
    pos_offset: int
    is_final_chunk: bool

    # Like the Rust Debug impl: the token list and cache handle would swamp scheduler logs,
    # so only their summary (q_len) is shown.
    def __repr__(self) -> str:
        return (
            f"UnifiedBatchItem(seq_id={self.seq_id!r}, q_len={len(self.q_tokens)}, "
            f"pos_offset={self.pos_offset}, is_final_chunk={self.is_final_chunk})"
        )


@dataclasses.dataclass
class UnifiedBatch:
    """Any mix of prefill chunks and decode steps for one forward.

    The executor returns one entry per item, in `items` order: logits for items with
    `is_final_chunk`, None for intermediate prefill chunks.
    """

    items: list[UnifiedBatchItem] = dataclasses.field(default_factory=list)

    def total_q_tokens(self) -> int:
        """Query tokens across all items: the M dimension of the unified forward's GEMMs."""
        return sum(len(item.q_tokens) for item in self.items)

    def num_sampled_items(self) -> int:
        """Items that produce a logits row (decode items, and prefill items on their last chunk)."""
        return sum(1 for item in self.items if item.is_final_chunk)


@dataclasses.dataclass(eq=False)
class SpeculativeDecodeOutput:
    """Result of verifying draft tokens.

    `accepted_tokens`: the accepted prefix of the draft tokens (`acceptance_count` of
    them). `next_logits`: `[batch, vocab]` logits for the token after the last accepted one.
    """

    accepted_tokens: list[int]
    next_logits: TensorRef
    kv_cache: KvCacheHandle
    acceptance_count: int
