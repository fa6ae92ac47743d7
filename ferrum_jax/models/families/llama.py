"""The Llama family: Llama 1/2/3, Mistral, Qwen2, Qwen3.

Pre-norm decoder layers (RMSNorm, attention, RMSNorm, SwiGLU MLP). The variants differ in
flags: q/k/v bias (Qwen2), o bias and MLP bias (Llama's `attention_bias` / `mlp_bias`), q/k
RMSNorm (Qwen3), tied embeddings, sliding windows (Mistral, Qwen's `max_window_layers`), RoPE
scaling (linear, llama3).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.attention import Attention
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import TRANSPOSE, Declarations, ParamDecl, linear, vector
from ferrum_jax.models.family import Family
from ferrum_jax.models.hf_rope import rope_from_hf
from ferrum_jax.models.mlp import MLP
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.quantization import Quantization

_HF = "model.layers.{}."
_GGUF = "blk.{}."


def attention_decls(cfg: ModelConfig, bias: bool, o_bias: bool, qk_norm: bool, qk_norm_init: str = "ones") -> list[ParamDecl]:
    """q/k/v/o (and their biases, q/k norms) under HF's `self_attn` names, shared with Gemma.
    Heads are flattened with head_dim (`wq [hidden, heads * head_dim]`, HF's order): one 2-D
    matrix a layer, which a tensor-parallel split of the heads divides evenly."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [
        linear("layers.attn.wq", (d, q), (None, "heads"), 1, _HF + "self_attn.q_proj.weight", _GGUF + "attn_q.weight", TRANSPOSE),
        linear("layers.attn.wk", (d, kv), (None, "kv_heads"), 1, _HF + "self_attn.k_proj.weight", _GGUF + "attn_k.weight", TRANSPOSE),
        linear("layers.attn.wv", (d, kv), (None, "kv_heads"), 1, _HF + "self_attn.v_proj.weight", _GGUF + "attn_v.weight", TRANSPOSE),
        linear("layers.attn.wo", (q, d), ("heads", None), 1, _HF + "self_attn.o_proj.weight", _GGUF + "attn_output.weight", TRANSPOSE),
    ]
    if bias:
        for ours, hf, gguf, size, axis in (("wq", "q", "attn_q", q, "heads"), ("wk", "k", "attn_k", kv, "kv_heads"), ("wv", "v", "attn_v", kv, "kv_heads")):
            out.append(vector(f"layers.attn.{ours}.bias", (size,), (axis,), _HF + f"self_attn.{hf}_proj.bias", _GGUF + f"{gguf}.bias", "zeros"))
    if o_bias:
        out.append(vector("layers.attn.wo.bias", (d,), (None,), _HF + "self_attn.o_proj.bias", _GGUF + "attn_output.bias", "zeros"))
    hd = cfg.head_dim
    if qk_norm:
        out += [
            vector("layers.attn.q_norm.weight", (hd,), (None,), _HF + "self_attn.q_norm.weight", _GGUF + "attn_q_norm.weight", qk_norm_init),
            vector("layers.attn.k_norm.weight", (hd,), (None,), _HF + "self_attn.k_norm.weight", _GGUF + "attn_k_norm.weight", qk_norm_init),
        ]
    return out


def mlp_decls(cfg: ModelConfig, bias: bool) -> list[ParamDecl]:
    """gate/up/down (and biases) under HF's `mlp` names, shared with Gemma."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    out = [
        linear("layers.mlp.gate", (d, f), (None, "ffn"), 1, _HF + "mlp.gate_proj.weight", _GGUF + "ffn_gate.weight", TRANSPOSE),
        linear("layers.mlp.up", (d, f), (None, "ffn"), 1, _HF + "mlp.up_proj.weight", _GGUF + "ffn_up.weight", TRANSPOSE),
        linear("layers.mlp.down", (f, d), ("ffn", None), 1, _HF + "mlp.down_proj.weight", _GGUF + "ffn_down.weight", TRANSPOSE),
    ]
    if bias:
        out += [
            vector("layers.mlp.gate.bias", (f,), ("ffn",), _HF + "mlp.gate_proj.bias", None, "zeros"),
            vector("layers.mlp.up.bias", (f,), ("ffn",), _HF + "mlp.up_proj.bias", None, "zeros"),
            vector("layers.mlp.down.bias", (d,), (None,), _HF + "mlp.down_proj.bias", None, "zeros"),
        ]
    return out


def embedding_decls(cfg: ModelConfig, vocab_rows: int, norm_init: str = "ones") -> list[ParamDecl]:
    """The embedding, final norm and (untied) lm_head, shared with Gemma."""
    d = cfg.hidden_size
    out = [
        ParamDecl("embed", (vocab_rows, d), ("vocab", None), "model.embed_tokens.weight", "token_embd.weight"),
        vector("final_norm.weight", (d,), (None,), "model.norm.weight", "output_norm.weight", norm_init),
    ]
    if not cfg.tie_word_embeddings:
        out.append(linear("lm_head", (d, vocab_rows), (None, "vocab"), 1, "lm_head.weight", "output.weight", TRANSPOSE))
    return out


def declare(cfg: ModelConfig, vocab_rows: int) -> list[ParamDecl]:
    d = cfg.hidden_size
    return [
        *embedding_decls(cfg, vocab_rows),
        vector("layers.input_norm.weight", (d,), (None,), _HF + "input_layernorm.weight", _GGUF + "attn_norm.weight", "ones"),
        vector("layers.post_attn_norm.weight", (d,), (None,), _HF + "post_attention_layernorm.weight", _GGUF + "ffn_norm.weight", "ones"),
        *attention_decls(cfg, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm),
        *mlp_decls(cfg, cfg.mlp_bias),
    ]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(decls["layers.input_norm.weight"], eps, dtype=dtype)
        self.attn = Attention(cfg, decls, dtype=dtype, rngs=rngs, quant=quant)
        self.post_attn_norm = RMSNorm(decls["layers.post_attn_norm.weight"], eps, dtype=dtype)
        self.mlp = self.feed_forward(cfg, decls, dtype=dtype, rngs=rngs, quant=quant)

    @staticmethod
    def feed_forward(cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None) -> nnx.Module:
        """The block after attention, `(x_td, backend) -> x_td`: the gated MLP (families.moe's
        layer puts its sparse mixture of experts here)."""
        return MLP(decls, cfg.hidden_act, dtype=dtype, rngs=rngs, quant=quant)

    def __call__(self, h_td, rope, k_pages, v_pages, meta, backend, sliding_window, k_scale=None, v_scale=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        attn_td, k_pages, v_pages = self.attn(
            self.input_norm(h_td), rope, k_pages, v_pages, meta, backend, sliding_window, k_scale, v_scale
        )
        h_td = h_td + attn_td
        h_td = h_td + self.mlp(self.post_attn_norm(h_td), backend)
        return h_td, k_pages, v_pages


def config(d: dict[str, Any], tag: str) -> ModelConfig:
    if d.get("hidden_act", "silu") != "silu":
        raise FerrumError.unsupported(f"hidden_act={d['hidden_act']!r}: only 'silu' is implemented for {tag}")
    if d.get("pretraining_tp", 1) != 1:
        raise FerrumError.unsupported(f"pretraining_tp={d['pretraining_tp']}: only 1 is implemented")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    num_layers = int(d["num_hidden_layers"])
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        architecture=tag,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(d),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
        qkv_bias=tag == "qwen2" or attention_bias,
        o_bias=tag != "qwen2" and attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=tag == "qwen3",
        sliding_windows=_sliding_windows(d, tag, num_layers),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos_ids(d),
    )


def eos_ids(d: dict[str, Any]) -> int | tuple[int, ...] | None:
    eos = d.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else eos


def layer_windows(d: dict[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    """Per-layer windows from `layer_types` (None when the config has none); an unknown type is
    refused by name."""
    layer_types = d.get("layer_types")
    if not layer_types:
        return None
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise FerrumError.unsupported(f"layer_types {unknown} are not supported; supported: full_attention, sliding_attention")
    if len(layer_types) != num_layers:
        raise FerrumError.invalid_config(f"{len(layer_types)} layer_types for num_hidden_layers={num_layers}")
    window = d.get("sliding_window")
    if "sliding_attention" in layer_types and not window:
        raise FerrumError.invalid_config("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _sliding_windows(d: dict[str, Any], tag: str, num_layers: int) -> tuple[int | None, ...]:
    from_types = layer_windows(d, num_layers)
    if from_types is not None:
        return from_types
    window = d.get("sliding_window")
    if tag == "mistral" and window:
        return (int(window),) * num_layers
    if tag in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
        first = int(d.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


LLAMA = Family(
    architectures={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"},
    model_types={"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"},
    gguf_architectures={"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"},
    config=config,
    declare=declare,
    block=DecoderLayer,
    gguf_permuted_tags=("llama", "mistral"),
)
