"""Tiny random HuggingFace checkpoints: the independent oracle for the parity tests.

Every variant is a real `transformers` model built from a config and written with
`save_pretrained(..., safe_serialization=True)`, so the JAX side loads exactly the
files (config.json spelling, safetensors names, tied-weight omissions) that the
installed transformers version produces. Nothing is downloaded.

Each variant exists to exercise one architecture feature the JAX model can get
wrong while the others still pass:

  llama3_gqa        llama3 rope scaling (small original_max so the frequency
                    ramp matters at short positions), GQA 4q/2kv, untied head
  llama3_legacy     same weights, config.json rewritten into the other rope
                    spelling (see `rewrite_rope_spelling`)
  llama_linear_mha  linear rope scaling, MHA, tied embeddings
  llama_mqa_hd      MQA (1 kv head), head_dim 32 != hidden/heads
  mistral           GQA; sliding_window None, because a window shorter than the
                    test sequences would need sliding-window support in JAX,
                    which these tests do not claim to cover
  qwen2             q/k/v bias (randomised: HF initialises them to zero)
  qwen3             q/k RMSNorm, explicit head_dim, tied embeddings

Weights are seeded and deliberately large (initializer_range 0.2, norms and biases
perturbed away from 1/0) so logits are far from uniform: greedy argmax then has
wide top-2 margins and float32 rounding cannot flip a token.

This module also holds the session fixtures (`hf_variant`, `unsupported_dir`);
there is no conftest, so the test module imports them explicitly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers

SEED = 1234
# Hidden 64 and 2 layers keep build + HF reference runs to well under a second each.
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=512,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama3_gqa() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        **_COMMON,
        vocab_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
    )


def _llama_linear_mha() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        **_COMMON,
        vocab_size=320,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        tie_word_embeddings=True,
    )


def _llama_mqa_hd() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        **_COMMON,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


def _mistral() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(
        **_COMMON,
        vocab_size=448,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def _qwen2() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        **_COMMON,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )


def _qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(
        **_COMMON,
        vocab_size=400,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1000000.0,
        use_sliding_window=False,
        tie_word_embeddings=True,
    )


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama3_gqa": _llama3_gqa,
    "llama_linear_mha": _llama_linear_mha,
    "llama_mqa_hd": _llama_mqa_hd,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}
# (variant, base): the variant is `base`'s checkpoint with its config.json rewritten
# into the other rope spelling.
_REWRITTEN = {"llama3_legacy": "llama3_gqa"}
VARIANTS = [*_CONFIGS, *_REWRITTEN]


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move norm weights off 1 and biases off 0.

    HF initialises RMSNorm weights to ones and attention biases to zeros, which would
    let a JAX model that ignores them (or applies them to the wrong tensor) pass.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def build_model(variant: str) -> transformers.PreTrainedModel:
    """The seeded random HF model for `variant` (eval mode, float32, eager attention)."""
    config = _CONFIGS[variant]()
    # Eager attention is the plainest reference implementation; sdpa would also do at
    # float32, but there is no reason to add a second kernel to the oracle.
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, torch.Generator().manual_seed(SEED + 1))
    return model.eval()


def rewrite_rope_spelling(config_path: Path) -> str:
    """Rewrite config.json's rope settings into the spelling the installed
    transformers does NOT write; return the name of the spelling written.

    transformers 5.x writes one `rope_parameters` dict (with `rope_theta` inside);
    4.x writes top-level `rope_theta` plus a `rope_scaling` dict. Real checkpoints on
    disk come in both forms, so the loader must read both.
    """
    cfg = json.loads(config_path.read_text())
    if "rope_parameters" in cfg:
        params = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
        written = "rope_theta+rope_scaling"
    else:
        params = dict(cfg.pop("rope_scaling") or {"rope_type": "default"})
        params["rope_theta"] = cfg.pop("rope_theta")
        cfg["rope_parameters"] = params
        written = "rope_parameters"
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return written


@dataclasses.dataclass
class HFVariant:
    name: str
    path: Path  # checkpoint directory the JAX executor loads
    model: transformers.PreTrainedModel  # the oracle: same weights, loaded in torch
    vocab_size: int


def save_variant(variant: str, root: Path) -> HFVariant:
    base = _REWRITTEN.get(variant, variant)
    model = build_model(base)
    path = root / variant
    model.save_pretrained(path, safe_serialization=True)
    if variant in _REWRITTEN:
        rewrite_rope_spelling(path / "config.json")
    # generate() fills any eos_token_id left None from model.generation_config, so
    # fixed-length greedy continuations need it cleared here, on the in-memory
    # oracle only (the saved generation_config.json keeps its realistic eos).
    model.generation_config.eos_token_id = None
    return HFVariant(variant, path, model, model.config.vocab_size)


@pytest.fixture(scope="session", params=VARIANTS)
def hf_variant(request, tmp_path_factory) -> HFVariant:
    return save_variant(request.param, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory) -> Path:
    """A genuine (tiny) GPT-2 checkpoint: an architecture ferrum_jax does not implement."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(SEED)
    path = tmp_path_factory.mktemp("unsupported") / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return path


def legacy_copy_matches(variant: HFVariant) -> bool:
    """Whether transformers itself reads the rewritten config back to the same model.

    Guards the fixture: if the rewrite changed the meaning of the config, a parity
    failure on the rewritten variant would be this module's bug, not the loader's.
    """
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        variant.path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.arange(3, 43, dtype=torch.long)[None]
    with torch.inference_mode():
        return bool(torch.equal(reloaded(ids).logits, variant.model(ids).logits))


__all__ = [
    "HFVariant",
    "VARIANTS",
    "build_model",
    "hf_variant",
    "legacy_copy_matches",
    "rewrite_rope_spelling",
    "save_variant",
    "unsupported_dir",
]
