"""attention="pallas" routes the model through the Pallas kernel (interpret mode on CPU):
full-model logits match the XLA path and HF transformers; "auto" picks XLA on CPU."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

import ferrum_jax as fj
from hf_models import save_variant

LIMITS = dict(dtype="float32", max_batch_size=2, max_sequence_length=64, page_size=8, max_num_batched_tokens=32)


def test_pallas_matches_xla_and_hf(tmp_path):
    variant = save_variant("llama3_gqa", tmp_path)
    toks = np.random.default_rng(0).integers(0, variant.vocab_size, 21).astype(np.int32)
    with torch.inference_mode():
        hf = variant.model(torch.tensor(toks[None], dtype=torch.long)).logits[0].numpy()

    def logits(attention):
        ex = fj.JaxModelExecutor.from_pretrained(variant.path, attention=attention, **LIMITS)

        async def go():
            out = await ex.prefill(fj.PrefillInput(input_ids=toks[None, :18]))
            rows = [out.logits[0]]
            for t in toks[18:]:
                d = await ex.decode(fj.DecodeInput(input_ids=np.array([[t]], np.int32), kv_cache=out.kv_cache))
                rows.append(d.logits)
            return ex, np.concatenate(rows)[:-1]

        return asyncio.run(go())

    ex_p, pallas = logits("pallas")
    ex_x, xla = logits("xla")
    assert ex_p.attention_impl == "pallas_interpret" and ex_x.attention_impl == "xla"
    assert fj.JaxModelExecutor.from_pretrained(variant.path, attention="auto", **LIMITS).attention_impl == "xla"
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
    scale = np.abs(hf[:20]).max()
    assert np.abs(pallas - hf[:20]).max() <= 1e-4 * scale
