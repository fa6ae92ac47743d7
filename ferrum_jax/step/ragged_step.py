"""One jitted ragged forward serves prefill, decode, chunked prefill, mixed batches and
speculative verify: they differ only in the batch metadata.

`make_ragged_step` returns logits; the engine's hot path feeds them, still on device, to
`make_sampler`'s program, which returns token ids. The sampler is a program of its own (one
per row bucket) rather than fused into the step so that the sampling and logits paths share
every step program: fusing them doubled the programs to compile at start-up, and the sampler
alone added ~0.7 s to each one's compile. The KV pages are donated, so XLA updates them in
place; the caller must replace its reference with the returned pages.

Async scheduling: the sampler also returns its ids padded to a fixed size, and a step takes a
`Feed` that overwrites chosen batch tokens with those ids on device, so the engine can launch
step N+1 (whose decodes consume step N's tokens) before step N's tokens reach the host.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ferrum_jax.batch.ragged import Feed, RaggedBatch
from ferrum_jax.kv.pages import KvPages
from ferrum_jax.models.paged_attention import AttentionBackend
from ferrum_jax.step.sampling import SamplingBatch, sample


def _forward(graphdef: nnx.GraphDef, backend: AttentionBackend, state: nnx.State, kv: KvPages, batch: RaggedBatch,
             feed: Feed):
    model = nnx.merge(graphdef, state)
    token_ids = batch.token_ids.at[feed.pos].set(feed.prev_ids[feed.rows], mode="drop")
    logits_lv, k, v = model(token_ids, batch.positions, kv.k, kv.v, batch.meta, batch.logits_indices, backend,
                            kv.k_scale, kv.v_scale)
    return logits_lv, dataclasses.replace(kv, k=k, v=v)


def _replicated(backend: AttentionBackend, tree):
    """`tree` on every device of the mesh when the mesh spans processes: each process then
    reads the results from its own devices, and a result split over the mesh (logits
    sharded by vocabulary) would be readable on no host. Within one process the host reads
    every shard itself, and the step keeps its collectives to the model's own."""
    if backend.mesh is None or all(d.process_index == jax.process_index() for d in backend.mesh.devices.flat):
        return tree
    everywhere = NamedSharding(backend.mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, everywhere), tree)


def make_ragged_step(graphdef: nnx.GraphDef, backend: AttentionBackend) -> Callable:
    """`step(state, kv, batch, feed) -> (logits [rows, vocab] f32, kv)`, jitted, kv donated."""

    def step(state: nnx.State, kv: KvPages, batch: RaggedBatch, feed: Feed):
        logits_lv, kv = _forward(graphdef, backend, state, kv, batch, feed)
        return _replicated(backend, logits_lv), kv

    return jax.jit(step, donate_argnames=("kv",))


def feed_sharding(backend: AttentionBackend) -> NamedSharding | None:
    """Where the sampler leaves its padded ids and a step expects them: on every device."""
    return None if backend.mesh is None else NamedSharding(backend.mesh, PartitionSpec())


def make_sampler(backend: AttentionBackend, feed_rows: int) -> Callable:
    """`sampler(logits [rows, vocab] f32, sampling) -> (SampledTokens [rows], ids [feed_rows])`,
    jitted; `ids` are the token ids padded with zeros, the `Feed.prev_ids` of a later step."""
    everywhere = feed_sharding(backend)

    def sampler(logits_lv, sampling):
        sampled = _replicated(backend, sample(logits_lv, sampling))
        ids = jnp.zeros(feed_rows, jnp.int32).at[: logits_lv.shape[0]].set(sampled.token_ids)
        if everywhere is not None:
            ids = jax.lax.with_sharding_constraint(ids, everywhere)
        return sampled, ids

    return jax.jit(sampler)
