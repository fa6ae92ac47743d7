"""Helpers of the parity tests on real GGUF models: transformers on the same file (the oracle), and
greedy continuations through the executor's batch interface."""

from __future__ import annotations

import numpy as np
import torch
import transformers

import ferrum_jax as fj


def transformers_gguf(path):
    """(tokenizer, float32 model in eval mode) of transformers' GGUF loader on `path`."""
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


async def batch_greedy(ex, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """`steps` greedy tokens for each prompt: one `batch_prefill`, then `batch_decode`s feeding
    back each row's host argmax; the caches are released after."""
    outs = await ex.batch_prefill([fj.PrefillInput(input_ids=np.array([p], np.int32)) for p in prompts])
    caches = [o.kv_cache for o in outs]
    seqs = [[int(np.argmax(np.asarray(o.last_token_logits())[0]))] for o in outs]
    for _ in range(steps - 1):
        ds = await ex.batch_decode([fj.DecodeInput(input_ids=np.array([[s[-1]]], np.int32), kv_cache=c) for s, c in zip(seqs, caches)])
        caches = [d.kv_cache for d in ds]
        for d, s in zip(ds, seqs):
            s.append(int(np.argmax(np.asarray(d.logits)[0])))
    for c in caches:
        ex.release_cache(c.cache_id)
    return seqs
