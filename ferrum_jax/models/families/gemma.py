"""The Gemma family: Gemma 2 and Gemma 3 (text; also the text part of Gemma 3's image-text
checkpoints).

Against Llama's block: the embedding scaled by sqrt(hidden) (rounded to the model dtype, as HF
does), RMSNorm as x * (1 + w) in float32, four norms per layer (input, post-attention,
pre-FFN, post-FFN: the attention and MLP outputs are normed before their residual adds), a
GeGLU MLP (tanh-approximate GELU), the score scale `query_pre_attn_scalar ** -0.5`, and
sliding-window and global layers in a pattern from the config.
- Gemma 2: attention-score and final-logit tanh soft-caps; layers alternate local/global.
- Gemma 3: q/k RMSNorm instead of the soft-caps; local:global 5:1 (`layer_types` or
  `sliding_window_pattern`); local layers use their own RoPE base (`rope_local_base_freq`),
  global ones `rope_theta` with the config's scaling.

Configs written by `save_pretrained` leave out fields equal to their class defaults, so the
defaults below are transformers' (Gemma2Config, Gemma3TextConfig); a missing field takes them,
an explicit null stays null.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.attention import Attention
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations, ParamDecl, vector
from ferrum_jax.models.families.llama import attention_decls, embedding_decls, eos_ids, layer_windows, mlp_decls
from ferrum_jax.models.family import Family
from ferrum_jax.models.hf_rope import rope_by_layer_type, rope_from_hf
from ferrum_jax.models.mlp import MLP
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.quantization import Quantization

_SHARED_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, bos_token_id=2, eos_token_id=1)
_DEFAULTS = {
    "gemma2": dict(_SHARED_DEFAULTS, vocab_size=256000, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   max_position_embeddings=8192, pattern=2),
    "gemma3": dict(_SHARED_DEFAULTS, vocab_size=262208, final_logit_softcapping=None, attn_logit_softcapping=None,
                   max_position_embeddings=131072, pattern=6),
}  # fmt: skip
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
_HF, _GGUF = "model.layers.{}.", "blk.{}."
# Gemma 3 image-text checkpoints: the text model under another prefix, beside a vision tower.
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
_VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\.")


def declare(cfg: ModelConfig, vocab_rows: int) -> list[ParamDecl]:
    d = cfg.hidden_size
    norms = [
        ("input_norm", "input_layernorm", "attn_norm"),
        ("post_attn_norm", "post_attention_layernorm", "post_attention_norm"),
        ("pre_mlp_norm", "pre_feedforward_layernorm", "ffn_norm"),
        ("post_mlp_norm", "post_feedforward_layernorm", "post_ffw_norm"),
    ]
    return [
        *embedding_decls(cfg, vocab_rows, norm_init="zeros"),
        *(vector(f"layers.{ours}.weight", (d,), (None,), _HF + f"{hf}.weight", _GGUF + f"{gguf}.weight", "zeros") for ours, hf, gguf in norms),
        *attention_decls(cfg, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, qk_norm_init="zeros"),
        *mlp_decls(cfg, False),
    ]


class GemmaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        def norm(name):
            return RMSNorm(decls[f"layers.{name}.weight"], cfg.rms_norm_eps, dtype=dtype, unit_offset=True)

        self.input_norm = norm("input_norm")
        self.attn = Attention(cfg, decls, dtype=dtype, rngs=rngs, quant=quant)
        self.post_attn_norm = norm("post_attn_norm")
        self.pre_mlp_norm = norm("pre_mlp_norm")
        self.mlp = MLP(decls, cfg.hidden_act, dtype=dtype, rngs=rngs, quant=quant)
        self.post_mlp_norm = norm("post_mlp_norm")

    def __call__(self, h_td, rope, k_pages, v_pages, meta, backend, sliding_window, k_scale=None, v_scale=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        attn_td, k_pages, v_pages = self.attn(
            self.input_norm(h_td), rope, k_pages, v_pages, meta, backend, sliding_window, k_scale, v_scale
        )
        h_td = h_td + self.post_attn_norm(attn_td)
        h_td = h_td + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h_td), backend))
        return h_td, k_pages, v_pages


def text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: Gemma 3 image-text configs nest it under `text_config`, their
    token ids at the top."""
    if "text_config" not in d:
        return d
    ids = {k: d[k] for k in ("bos_token_id", "eos_token_id") if k in d}
    return {**ids, **d["text_config"]}


def config(d: dict[str, Any], tag: str) -> ModelConfig:
    d = text_config(d)
    defaults = _DEFAULTS[tag]

    def get(key):
        return d.get(key, defaults.get(key))

    act = d.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise FerrumError.unsupported(f"hidden_activation={act!r}: {tag} is implemented with {_GELU_TANH[0]!r} only")
    if d.get("use_bidirectional_attention"):
        raise FerrumError.unsupported(f"use_bidirectional_attention=True ({tag} as an encoder) is not supported")
    num_layers = int(get("num_hidden_layers"))
    windows = layer_windows({**d, "sliding_window": get("sliding_window")}, num_layers)
    if windows is None:
        pattern = int(d.get("sliding_window_pattern", defaults["pattern"]))
        window = int(get("sliding_window"))
        windows = tuple(window if (i + 1) % pattern else None for i in range(num_layers))
    if tag == "gemma3":
        rope, local_rope = rope_by_layer_type(d, 1_000_000.0, 10_000.0)
    else:
        rope, local_rope = rope_from_hf(d), None
    num_heads = int(get("num_attention_heads"))
    attention_bias = bool(get("attention_bias"))
    soft_caps = [get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
    return ModelConfig(
        architecture=tag,
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("num_key_value_heads")),
        head_dim=int(get("head_dim")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope=rope,
        local_rope=local_rope if local_rope != rope else None,
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=tag == "gemma3",
        sliding_windows=windows,
        hidden_act="gelu_tanh",
        norm_unit_offset=True,
        embed_scale=True,
        query_scale=float(get("query_pre_attn_scalar")) ** -0.5,
        attn_soft_cap=None if soft_caps[0] is None else float(soft_caps[0]),
        final_soft_cap=None if soft_caps[1] is None else float(soft_caps[1]),
        bos_token_id=get("bos_token_id"),
        eos_token_id=eos_ids({"eos_token_id": get("eos_token_id")}),
    )


def gguf_config(key, base: dict[str, Any]) -> dict[str, Any]:
    """Gemma fields of a llama.cpp file. llama.cpp writes no layer pattern, local RoPE base or
    query scale: it hard-codes the pattern (Gemma 2 alternating, Gemma 3 5:1) and local base
    (10000), which are the config defaults, and scales queries by head_dim ** -0.5 except for
    the 27B models (hidden / heads), as their HF configs' `query_pre_attn_scalar` do. Soft-caps
the file does not hold take the config defaults."""
    out = {"hidden_activation": "gelu_pytorch_tanh"}
    is_27b = (base["num_hidden_layers"], base["hidden_size"]) in ((46, 4608), (62, 5376))
    out["query_pre_attn_scalar"] = base["hidden_size"] // base["num_attention_heads"] if is_27b else base["head_dim"]
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = key(name, "absent")
        if value != "absent":
            out[name] = float(value)
    return out


def hf_rename(name: str) -> str | None:
    """A checkpoint tensor name as the text model's (image-text checkpoints), None for the
    vision tower's tensors, which a text model does not load."""
    if _VISION.match(name):
        return None
    for prefix, canonical in _MULTIMODAL_PREFIXES:
        if name.startswith(prefix):
            return canonical + name[len(prefix):]
    return name


GEMMA = Family(
    architectures={"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3"},
    model_types={"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"},
    gguf_architectures={"gemma2": "gemma2", "gemma3": "gemma3"},
    config=config,
    declare=declare,
    block=GemmaDecoderLayer,
    gguf_norms_plus_one=True,
    gguf_model_type={"gemma3": "gemma3_text"},
    gguf_config=gguf_config,
    hf_rename=hf_rename,
)
