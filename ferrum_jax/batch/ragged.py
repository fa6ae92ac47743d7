"""The ragged batch: every step (prefill, decode, chunked prefill, mixed, verify) is one of
these, padded to a `StepShape`.

Host-side, the executor describes each sequence's work as a `SequenceChunk`;
`build_ragged_batch` lays the chunks out flat, pads, and records which logit row belongs
to which chunk. Everything here is numpy: building a batch compiles nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.models.paged_attention import AttentionMetadata

PADDING_SLOT = 0  # slot 0 of the reserved page 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """token_ids, positions `[tokens]`; meta (see AttentionMetadata); logits_indices `[rows]`."""

    token_ids: jax.Array
    positions: jax.Array
    meta: AttentionMetadata
    logits_indices: jax.Array


@dataclasses.dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence appended at kv position `kv_offset`.

    positions: RoPE positions of the tokens (normally kv_offset + arange).
    page_tables: per KV group (kv.layout) the sequence's pages, covering at least kv_offset +
    len(token_ids) tokens (0 for a page a sliding window has passed).
    logits: "none" | "last" | "all" — which of the chunk's rows produce logits.
    """

    token_ids: np.ndarray
    positions: np.ndarray
    kv_offset: int
    page_tables: Sequence[Sequence[int]]
    logits: str


def build_ragged_batch(
    chunks: Sequence[SequenceChunk], spec: BucketSpec, page_size: int
) -> tuple[RaggedBatch, StepShape, list[np.ndarray]]:
    """Returns the padded batch, its shape, and per chunk the logit-row indices it owns."""
    lens = [len(c.token_ids) for c in chunks]
    total = sum(lens)
    all_rows = any(c.logits == "all" for c in chunks)
    shape = spec.shape_for(total, len(chunks), all_rows)
    t, s, g = shape.tokens, shape.seqs, spec.kv_groups

    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    slot_mapping = np.full((g, t), PADDING_SLOT, np.int32)
    cu_q_lens = np.full(s + 1, total, np.int32)
    kv_lens = np.zeros(s, np.int32)
    page_table = np.zeros((g, s, spec.pages_per_seq), np.int32)
    logits_indices = np.zeros(shape.logit_rows, np.int32)
    rows_of_chunk: list[np.ndarray] = []

    start, row = 0, 0
    for i, (c, n) in enumerate(zip(chunks, lens)):
        end = start + n
        token_ids[start:end] = c.token_ids
        positions[start:end] = c.positions
        kv_pos = c.kv_offset + np.arange(n)
        for group, table in enumerate(c.page_tables):
            pages = np.asarray(table, np.int32)
            slot_mapping[group, start:end] = pages[kv_pos // page_size] * page_size + kv_pos % page_size
            page_table[group, i, : len(pages)] = pages
        cu_q_lens[i] = start
        kv_lens[i] = c.kv_offset + n
        wanted = {"none": np.arange(0), "last": np.arange(end - 1, end), "all": np.arange(start, end)}[c.logits]
        logits_indices[row : row + len(wanted)] = wanted
        rows_of_chunk.append(np.arange(row, row + len(wanted)))
        row += len(wanted)
        start = end
    cu_q_lens[len(chunks)] = total

    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_table=page_table,
        num_seqs=np.asarray(len(chunks), np.int32),
    )
    batch = RaggedBatch(token_ids=token_ids, positions=positions, meta=meta, logits_indices=logits_indices)
    return batch, shape, rows_of_chunk


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Feed:
    """Token ids a step takes from an earlier step's sampler without a trip through the host
    (async scheduling): batch token `pos[i]` becomes `prev_ids[rows[i]]`; a `pos` past the
    batch (NO_FEED) feeds nothing. All `[feed_rows]` int32; prev_ids is the sampler's
    padded ids output, on device."""

    prev_ids: jax.Array
    pos: jax.Array
    rows: jax.Array


NO_FEED = 1 << 30


def build_feed(prev_ids: jax.Array, pairs: Sequence[tuple[int, int]]) -> Feed:
    """A feed of (batch token position, row of prev_ids) pairs."""
    n = prev_ids.shape[0]
    if len(pairs) > n:
        raise ValueError(f"{len(pairs)} fed tokens exceed the {n} rows of the previous step's ids")
    pos = np.full(n, NO_FEED, np.int32)
    rows = np.zeros(n, np.int32)
    for i, (p, r) in enumerate(pairs):
        pos[i], rows[i] = p, r
    return Feed(prev_ids=prev_ids, pos=pos, rows=rows)


def dummy_batch(shape: StepShape, spec: BucketSpec) -> RaggedBatch:
    """An all-padding batch of `shape` (num_seqs 0): compiles the program, touches only page 0."""
    t, s, g = shape.tokens, shape.seqs, spec.kv_groups
    meta = AttentionMetadata(
        slot_mapping=np.full((g, t), PADDING_SLOT, np.int32),
        cu_q_lens=np.zeros(s + 1, np.int32),
        kv_lens=np.zeros(s, np.int32),
        page_table=np.zeros((g, s, spec.pages_per_seq), np.int32),
        num_seqs=np.asarray(0, np.int32),
    )
    return RaggedBatch(
        token_ids=np.zeros(t, np.int32),
        positions=np.zeros(t, np.int32),
        meta=meta,
        logits_indices=np.zeros(shape.logit_rows, np.int32),
    )
