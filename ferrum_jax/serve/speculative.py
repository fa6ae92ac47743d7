"""Speculative decoding in the server: the engine's drafter, from the `--speculative-*` flags.

    --speculative-method ngram [--ngram-prompt-lookup-max 4 --ngram-prompt-lookup-min 1]
    --speculative-method draft --speculative-model DIR | preset:NAME[:SEED]
    --num-speculative-tokens K   (default 4 with a method)

The engine verifies the drafts of every decoding request in one forward and keeps the
output distribution exactly the target's (greedy requests: token for token the same), so
the flags change speed only. A draft model is loaded with the target's *effective* limits
(dtype, page size, batch, context, batched tokens, KV pool size, tensor parallelism), not
with the flags: the draft keeps a KV cache for every running request, up to the target's
length, so it needs the same room, and identical limits give it the same step shapes (a
preset draft of the target's architecture then reuses the target's compiled programs).
"""

from __future__ import annotations

from ferrum_jax.engine.draft_model import DraftModelDrafter
from ferrum_jax.engine.drafter import Drafter, NgramDrafter
from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.serve.loading import ModelSource
from ferrum_jax.serve.settings import ServeSettings


def build_drafter(s: ServeSettings, target, wrap=lambda executor: executor):
    """(drafter, draft executor): (None, None) without speculation; the executor is None
    for n-gram lookup, and otherwise has to be warmed up like the target. wrap: applied
    to the draft executor before the drafter gets it (a multi-host leader's lockstep)."""
    if s.speculative_method == "ngram":
        return NgramDrafter(max_n=s.ngram_max, min_n=s.ngram_min), None
    if s.speculative_method == "draft":
        draft = ModelSource.parse(s.speculative_model).load(
            dtype=target.dtype,
            page_size=target.page_size,
            max_batch_size=target.max_batch_size,
            max_sequence_length=target.max_sequence_length,
            max_num_batched_tokens=target.buckets.max_num_batched_tokens,
            num_pages=target.num_total_pages + PageAllocator.RESERVED,
            attention=s.attention,
            tensor_parallel_size=target.tensor_parallel_size,
            # The drafter feeds the draft model whole contexts and never looks prefixes up.
            enable_prefix_caching=False,
        )
        draft = wrap(draft)
        drafter: Drafter = DraftModelDrafter(draft, target_vocab_size=target.cfg.vocab_size)
        return drafter, draft
    return None, None
