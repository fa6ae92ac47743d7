"""Driving an executor the way the parity tests compare it with HF: a prefill, then decodes."""

from __future__ import annotations

import asyncio

import numpy as np

import ferrum_jax as fj


def prefill_then_decode(ex, ids: np.ndarray, decode: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits `[n, vocab]` of `ids [1, n]` and the logits of decoding `decode` one token at
    a time after it."""

    async def go():
        out = await ex.prefill(fj.PrefillInput(input_ids=ids))
        handle, steps = out.kv_cache, []
        for tok in decode:
            d = await ex.decode(fj.DecodeInput(input_ids=np.array([[tok]], np.int32), kv_cache=handle))
            handle = d.kv_cache
            steps.append(np.asarray(d.logits)[0])
        return np.asarray(out.logits)[0], np.stack(steps)

    return asyncio.run(go())
