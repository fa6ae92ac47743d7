"""Small GGUF files written in the test, the way llama.cpp's converter lays them out.

`write_gguf(model, path, tensor_type, vocab)` takes a random tiny HF model (transformers, torch)
and writes its config as `{arch}.*` metadata, its tensors under llama.cpp names (q/k rows
permuted for `llama`, Gemma's norm weights stored as w + 1, as llama.cpp's converter does), 2-D tensors in `tensor_type` and 1-D ones
(norms, biases) in F32, and a tokenizer (`Vocab`). The oracle for what such a file means is
transformers' own GGUF loader reading the same file, never this writer.

Tensor types: F32/F16/BF16 and Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are quantized from the model's weights
with the `gguf` package's quantizers. The package has no quantizer for the K-quants, so those
tensors are random blocks whose float16 scale fields are set to small values (random bits
there would be inf/NaN): every block is valid and dequantizes to weights of a usable size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import torch

QK_K = 256
# K-quant block: bytes, and the offsets of its float16 scale fields (d, then dmin where present).
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
             "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}  # fmt: skip
# (d, dmin) per type: weights of about initializer size (~0.05), with dmin offsetting the
# unsigned quants' mean, so attention scores stay spread out instead of saturating.
_K_SCALE = {"Q2_K": (4e-3, 6e-3), "Q3_K": (1.5e-3,), "Q4_K": (2e-4, 1.5e-3), "Q5_K": (1e-4, 1.55e-3), "Q6_K": (5e-5,)}

@dataclasses.dataclass
class Vocab:
    """A GGUF tokenizer: `model` is 'llama' (SentencePiece) or 'gpt2' (byte-level BPE)."""

    model: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    chat_template: str | None = None


def _arch(config) -> str:
    return {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
            "qwen3_moe": "qwen3moe", "mixtral": "llama"}[config.model_type]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter: within each head, the two rotary halves are interleaved pairwise.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
}  # fmt: skip


# Gemma's four norms, as llama.cpp's converter names them (Llama's post-attention norm is its ffn_norm).
_GEMMA_NAMES = {**_NAMES, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GEMMA_NAMES if arch.startswith('gemma') else _NAMES)[module]}.{kind}"


def _expert_tensors(hf: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """transformers' fused expert tensors (`experts.gate_up_proj [E, 2 ffn, hidden]`, `experts.down_proj
    [E, hidden, ffn]`) as llama.cpp's per-layer stacks `ffn_{gate,up,down}_exps [E, out, in]`."""
    layer = hf.split(".")[2]
    if hf.endswith("gate_up_proj"):
        gate, up = np.split(value, 2, axis=1)
        return [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
    return [(f"blk.{layer}.ffn_down_exps.weight", value)]


def _encode(w: np.ndarray, tensor_type: str, rng: np.random.Generator) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type == "F32":
        return w.astype(np.float32), qtype
    if tensor_type == "F16":
        return w.astype(np.float16), qtype
    if tensor_type in _K_BLOCKS:
        size, scale_offsets = _K_BLOCKS[tensor_type]
        rows, cols = w.shape
        assert cols % QK_K == 0, f"{tensor_type} needs rows of a multiple of {QK_K} values, got {cols}"
        blocks = rng.integers(0, 256, (rows, cols // QK_K, size), dtype=np.uint8)
        for off, value in zip(scale_offsets, _K_SCALE[tensor_type]):
            blocks[..., off : off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        return blocks.reshape(rows, -1), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(
    model, path: Path, tensor_type: str, vocab: Vocab, seed: int = 0, rope_freqs: np.ndarray | None = None,
    mixed: dict[str, str] | None = None,
) -> Path:
    """mixed: GGUF tensor-name suffix -> the type of the 2-D tensors with that suffix instead of
    `tensor_type` (a llama.cpp Q4_K_M file puts some ffn_down and attn_v tensors in Q6_K)."""
    cfg = model.config
    arch = _arch(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    for name, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id)):
        if value is not None:
            getattr(w, f"add_{name}_token_id")(value)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    if cfg.model_type in ("qwen3_moe", "mixtral"):
        w.add_expert_count(cfg.num_experts if arch == "qwen3moe" else cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "gemma2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)

    rng = np.random.default_rng(seed)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, value in state.items():
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            value = _permute(value, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            value = _permute(value, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and hf.endswith("norm.weight"):
            value = value + 1  # llama.cpp's RMSNorm multiplies by w; Gemma's by 1 + w
        for name, value in _expert_tensors(hf, value) if ".mlp.experts." in hf else [(gguf_name(hf, arch), value)]:
            kind = next((t for suffix, t in (mixed or {}).items() if name.endswith(suffix)), tensor_type)
            data, qtype = _encode(value, kind, rng) if value.ndim >= 2 else (value, gguf.GGMLQuantizationType.F32)
            w.add_tensor(name, data, raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
