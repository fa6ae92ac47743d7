"""Tiny random Gemma 2 / Gemma 3 checkpoints built by transformers (`save_pretrained`), and
their HF logits: the oracle of tests/test_gemma.py and tests/test_sliding_window_kv.py."""

from __future__ import annotations

import numpy as np
import torch
import transformers

COMMON = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
    max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2, sliding_window=8,
    query_pre_attn_scalar=24, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)  # fmt: skip


def _gemma2():
    return transformers.Gemma2Config(
        **COMMON, num_hidden_layers=4, num_key_value_heads=2, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
    )


def gemma3(layers: int, pattern: int, kv_heads: int = 1):
    return transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=layers, num_key_value_heads=kv_heads,
        layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    )  # fmt: skip


CONFIGS = {
    "gemma2": _gemma2,
    # 2 local then 1 global, twice: one loop over a 3-layer block.
    "gemma3_3x2": lambda: gemma3(6, 3),
    # Gemma 3's 5:1 over 7 layers: a 6-layer block once, then one local layer.
    "gemma3_6x1+1": lambda: gemma3(7, 6),
}


def build(name: str, root) -> tuple[str, torch.nn.Module]:
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    path = root / name
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def prompt(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(3, 300, size=(1, n), dtype=np.int32)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(ids.astype(np.int64))).logits[0].numpy()
