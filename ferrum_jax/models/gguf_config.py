"""A HF-style `config.json` dict rebuilt from a GGUF file's metadata.

GGUF files carry no config.json: llama.cpp stores the model's shape under `{arch}.*` keys.
Rebuilding the HF dict (rather than a `ModelConfig` directly) keeps one path for every
checkpoint kind: `ModelConfig.from_hf_dict` validates it, and orbax conversion stores it.

Architectures: those the registry's families list (models.registry): `llama` (Llama 1/2/3, and
Mistral 7B, which llama.cpp writes as `llama`), `mistral`, `qwen2`, `qwen3`, `qwen3moe`, `gemma2`,
`gemma3`; the keys every llama.cpp architecture writes are read here, a family's own ones by its
`gguf_config`. What the metadata cannot express is refused, never approximated: a RoPE scaling
other than linear, or a `rope_freqs` tensor that is not Llama 3's frequency ramp.
"""

from __future__ import annotations

import math

import numpy as np

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.gguf_file import GGUFFile
from ferrum_jax.models.registry import resolve_gguf

# Llama 3.1 / 3.2 ship their RoPE scaling as a `rope_freqs` tensor of per-frequency divisors
# computed from these parameters (factor, low_freq_factor, high_freq_factor, original context).
_LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def hf_config_from_gguf(f: GGUFFile) -> dict:
    arch = f.require("general.architecture")
    fam, tag = resolve_gguf(arch, f.path, bool(f.get(f"{arch}.expert_count")))
    hf_arch = next(name for name, t in fam.architectures.items() if t == tag)

    def key(name, default=None):
        return f.get(f"{arch}.{name}", default) if default is not None else f.require(f"{arch}.{name}")

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") or hidden // num_heads)
    vocab = f.get(f"{arch}.vocab_size") or f.tensors["token_embd.weight"].shape[0]
    cfg = {
        "architectures": [hf_arch],
        "model_type": fam.gguf_model_type.get(tag, tag),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "hidden_act": "silu",
    }
    rope_scaling = _rope_scaling(f, arch, head_dim, cfg["rope_theta"])
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    window = f.get(f"{arch}.attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
        cfg["use_sliding_window"] = True
    for name in ("bos", "eos"):
        token_id = f.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            cfg[f"{name}_token_id"] = int(token_id)
    if fam.gguf_config is not None:
        cfg.update(fam.gguf_config(key, cfg))
    return cfg


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> dict | None:
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        return _llama3_from_freqs(f, head_dim, theta)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.require(f"{arch}.rope.scaling.factor"))}
    raise FerrumError.unsupported(f"GGUF {f.path}: {arch}.rope.scaling.type={kind!r}; supported: none, linear")


def _llama3_from_freqs(f: GGUFFile, head_dim: int, theta: float) -> dict:
    divisors = f.dequantize("rope_freqs.weight").reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    for factor, low, high, original in _LLAMA3_ROPE_CANDIDATES:
        smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
        expected = 1.0 / ((1 - smooth) / factor + smooth)
        if divisors.shape == expected.shape and np.allclose(divisors, expected, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}  # fmt: skip
    raise FerrumError.unsupported(
        f"GGUF {f.path}: its rope_freqs tensor is not Llama 3's frequency scaling for any of "
        f"(factor, low, high, original context) in {list(_LLAMA3_ROPE_CANDIDATES)}"
    )
