"""Model configuration read from a HF `config.json`.

One frozen dataclass covers the Llama family (Llama 1/2/3, Mistral, Qwen2, Qwen3): they
differ only in flags (q/k/v bias, q/k RMSNorm, tied embeddings, sliding window, RoPE
scaling). The config is hashable so it can ride along as a static jit argument.

Both transformers spellings of RoPE are accepted: 4.x (`rope_theta` + `rope_scaling`)
and 5.x (`rope_parameters`). Anything this module does not implement exactly is a
`FerrumError` naming the option, never a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ferrum_jax.interfaces.errors import FerrumError

# HF architecture name -> our family tag; the tag selects the flags that differ.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of `default`, `linear`, `llama3`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: the sliding window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise FerrumError.invalid_config(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise FerrumError.invalid_config(
                f"{len(self.sliding_windows)} layer attention types for {self.num_layers} layers"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hq * hd * 2 + d * hk * hd * 2
        attn += (hq + 2 * hk) * hd if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return self.num_layers * per_layer + v * d + d + head

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FerrumError.invalid_config(f"no config.json in {path}")
        return cls.from_hf_dict(json.loads(cfg_path.read_text()))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        family = _family(d)
        if d.get("hidden_act", "silu") != "silu":
            raise FerrumError.unsupported(f"hidden_act={d['hidden_act']!r}: only 'silu' is implemented")
        if d.get("pretraining_tp", 1) != 1:
            raise FerrumError.unsupported(f"pretraining_tp={d['pretraining_tp']}: only 1 is implemented")
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        num_layers = int(d["num_hidden_layers"])
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            architecture=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope(d),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_windows=_sliding_windows(d, family, num_layers),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        )


def _family(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    if archs:
        raise FerrumError.unsupported(
            f"architecture {archs[0]!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    model_type = d.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise FerrumError.unsupported(
        f"model_type {model_type!r} is not supported; supported: {sorted(_MODEL_TYPES)}"
    )


def _rope(d: dict[str, Any]) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise FerrumError.unsupported(f"rope_type={rope_type!r} is not supported; supported: {_ROPE_TYPES}")
    partial = d.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise FerrumError.unsupported(f"partial_rotary_factor={partial}: only 1.0 is implemented")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(merged["factor"]))
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )


def _sliding_windows(d: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    layer_types = d.get("layer_types")
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise FerrumError.unsupported(f"layer_types {unknown} are not supported")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if family == "mistral" and window:
        return (int(window),) * num_layers
    if family in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
        first = int(d.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers
