"""Mixture-of-experts Llama-shaped models: Qwen3-MoE and Mixtral.

The decoder layer is Llama's (pre-norm RMSNorm, attention, RMSNorm) with the MLP a sparse MoE
block (models.moe) in every layer. Qwen3-MoE adds Qwen3's q/k norms; its `mlp_only_layers` /
`decoder_sparse_step` can make some layers dense, which a stacked layer of one shape cannot hold
yet, so such configs are refused by name. HF stores each expert as its own tensors
(`mlp.experts.{e}.gate_proj` for Qwen3-MoE, `block_sparse_moe.experts.{e}.w1/w3/w2` for
Mixtral); they load into `[experts, ...]` stacks (models.declare). GGUF: llama.cpp's `qwen3moe`
files and its `llama` files with experts (Mixtral, q/k rows permuted as for Llama), a layer's
experts one tensor each of gate/up/down (models.gguf_weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import TRANSPOSE, Declarations, ParamDecl, vector
from ferrum_jax.models.families import llama
from ferrum_jax.models.families.llama import attention_decls, config as llama_config, embedding_decls
from ferrum_jax.models.family import Family
from ferrum_jax.models.moe import SparseMoE
from ferrum_jax.models.quantization import Quantization

_HF = "model.layers.{}."
_GGUF = "blk.{}."
# tag -> HF names of the router and of one expert's gate, up and down projections.
_EXPERT_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight",
                  "mlp.experts.{}.down_proj.weight"),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.w1.weight",
                "block_sparse_moe.experts.{}.w3.weight", "block_sparse_moe.experts.{}.w2.weight"),
}  # fmt: skip


def declare(cfg: ModelConfig, vocab_rows: int) -> list[ParamDecl]:
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    router, gate, up, down = (_HF + n for n in _EXPERT_NAMES[cfg.architecture])
    # llama.cpp's names, one tensor for all of a layer's experts (models.gguf_weights).
    g_router, g_gate, g_up, g_down = (_GGUF + n for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight",
                                                          "ffn_up_exps.weight", "ffn_down_exps.weight"))
    return [
        *embedding_decls(cfg, vocab_rows),
        vector("layers.input_norm.weight", (d,), (None,), _HF + "input_layernorm.weight", _GGUF + "attn_norm.weight", "ones"),
        vector("layers.post_attn_norm.weight", (d,), (None,), _HF + "post_attention_layernorm.weight",
               _GGUF + "ffn_norm.weight", "ones"),
        *attention_decls(cfg, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm),
        ParamDecl("layers.mlp.router", (d, e), (None, None), router, g_router, TRANSPOSE),
        ParamDecl("layers.mlp.gate", (e, d, f), ("experts", None, "ffn"), gate, g_gate, TRANSPOSE),
        ParamDecl("layers.mlp.up", (e, d, f), ("experts", None, "ffn"), up, g_up, TRANSPOSE),
        ParamDecl("layers.mlp.down", (e, f, d), ("experts", "ffn", None), down, g_down, TRANSPOSE),
    ]


class DecoderLayer(llama.DecoderLayer):
    """Llama's decoder layer with the sparse mixture of experts as its MLP."""

    @staticmethod
    def feed_forward(cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None) -> nnx.Module:
        return SparseMoE(cfg, decls, dtype=dtype, rngs=rngs, quant=quant)


def config(d: dict[str, Any], tag: str) -> ModelConfig:
    if tag == "qwen3_moe":
        num_layers, step = int(d["num_hidden_layers"]), int(d.get("decoder_sparse_step", 1))
        dense = sorted(set(d.get("mlp_only_layers") or []) | {i for i in range(num_layers) if (i + 1) % step})
        if dense:
            raise FerrumError.unsupported(
                f"Qwen3-MoE with dense layers {dense} (mlp_only_layers / decoder_sparse_step={step}): only "
                "configs where every layer is a MoE layer are implemented")
        base = llama_config(d, "qwen3")
        width, norm = int(d["moe_intermediate_size"]), bool(d.get("norm_topk_prob", False))
    else:
        base = llama_config(d, "mistral")
        width, norm = int(d["intermediate_size"]), True
    # Qwen's own configs say num_experts; transformers 5 writes num_local_experts for both.
    experts = int(d.get("num_experts") or d["num_local_experts"])
    return dataclasses.replace(
        base, architecture=tag, num_experts=experts, experts_per_token=int(d["num_experts_per_tok"]),
        moe_intermediate_size=width, norm_topk_prob=norm, moe_float32_weights=tag == "mixtral",
    )


def gguf_config(key, base: dict) -> dict:
    """The expert keys. llama.cpp renormalizes the top-k weights of every qwen3moe model; a
    Mixtral (`llama` file with experts) has experts as wide as its `feed_forward_length`."""
    experts, used = int(key("expert_count")), int(key("expert_used_count"))
    if base["model_type"] == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    return {"num_experts": experts, "num_experts_per_tok": used,
            "moe_intermediate_size": int(key("expert_feed_forward_length")), "norm_topk_prob": True}


MOE = Family(
    architectures={"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"},
    model_types={"qwen3_moe": "qwen3_moe", "mixtral": "mixtral"},
    gguf_architectures={"qwen3moe": "qwen3_moe"},
    gguf_expert_architectures={"llama": "mixtral"},
    gguf_permuted_tags=("mixtral",),
    gguf_config=gguf_config,
    config=config,
    declare=declare,
    block=DecoderLayer,
)
