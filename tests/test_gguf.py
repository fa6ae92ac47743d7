"""GGUF checkpoints: small files written here (tests/gguf_files.py) from random tiny HF models, one
per tensor type, loaded by ferrum_jax and by transformers' own GGUF loader (the oracle) with the
same logits; tokenizers built from GGUF metadata against the ones transformers builds from the
same file; conversion to orbax keeping the source dtype; and clear errors for bad files."""

from __future__ import annotations

import asyncio
import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import ferrum_jax as fj
from ferrum_jax.executor.loading import source_dtype
from ferrum_jax.models.param_tree import flatten_state
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.registry import declarations
from ferrum_jax.serve.tokenizer import load_tokenizer
from gguf_files import Vocab, write_gguf

VOCAB = 384
LIMITS = dict(dtype="float32", max_batch_size=2, max_sequence_length=64, page_size=8, max_num_batched_tokens=32)
# Rows of 256 values (hidden, heads * head_dim, intermediate), so every K-quant block layout fits.
SHAPE = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=512,
             initializer_range=0.05, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)  # fmt: skip
TENSOR_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "In the beginning there was the word, and the word was written in many languages.",
    "Models read text as tokens; a tokenizer splits the text into pieces the model knows.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Numbers like 42, 2024 and 3.14159 appear in text too, as do dates: 2026-12-03.",
] * 4
TEXTS = [
    "The quick brown fox, 2024 edition!",
    "Größe, naïve café — 東京は日本の首都です。 Привет, мир! مرحبا 🙂🚀",
    "  leading spaces\tand\ttabs\n\nnew lines   trailing  ",
    "<s>special</s> tokens<|im_end|> inside text",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Größe? 東京?"}]


def run(coro):
    return asyncio.run(coro)


def sentencepiece_vocab() -> Vocab:
    """A SentencePiece BPE vocabulary (no merges stored: they come from the scores), with byte
    fallback tokens, filled to VOCAB with the corpus' characters and word prefixes."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = list(dict.fromkeys(c for line in CORPUS for c in line.replace(" ", "▁")))
    pieces = ["▁", *[p for p in pieces if p != "▁"]]
    words = sorted({"▁" + w for line in CORPUS for w in line.split()}, key=lambda w: (len(w), w))
    for w in words:
        pieces += [w[:i] for i in range(2, len(w) + 1) if w[:i] not in pieces]
    pieces = pieces[: VOCAB - len(tokens)]
    return Vocab(
        model="llama", tokens=tokens + pieces, token_types=types + [1] * len(pieces),
        scores=[0.0] * len(tokens) + [-float(i) for i in range(len(pieces))],
        bos_id=1, eos_id=2, unk_id=0, chat_template=CHATML,
    )  # fmt: skip


def byte_level_vocab() -> Vocab:
    """A byte-level BPE vocabulary trained on the corpus, with ChatML control tokens at the end."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert len(tokens) == VOCAB - len(specials)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {t: VOCAB - len(specials) + i for i, t in enumerate(specials)}
    return Vocab(
        model="gpt2", tokens=tokens + specials, token_types=[1] * len(tokens) + [3] * len(specials), merges=merges,
        pre="qwen2", bos_id=ids["<|endoftext|>"], eos_id=ids["<|im_end|>"], chat_template=CHATML,
    )  # fmt: skip


def hf_model(kind: str, **overrides) -> transformers.PreTrainedModel:
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "gemma2": transformers.Gemma2Config}  # fmt: skip
    config = config_cls[kind](**{**SHAPE, "tie_word_embeddings": kind not in ("llama", "mistral"), **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():  # norms off 1 and biases off 0, or a loader that drops them would pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def transformers_logits(path, tokens) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.inference_mode():
        return model.eval()(torch.tensor([tokens])).logits[0].numpy()


def ferrum_logits(path, tokens, **options) -> np.ndarray:
    ex = fj.JaxModelExecutor.from_pretrained(path, progress=False, **LIMITS, **options)
    out = run(ex.prefill(fj.PrefillInput(input_ids=np.array([tokens], np.int32))))
    return np.asarray(out.logits)[0]


def assert_close(ours, ref, rel=1e-4):
    assert ours.shape == ref.shape
    assert np.isfinite(ref).all()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max |diff| / max |logit| = {err:.2e}"


TOKENS = list(np.random.default_rng(3).integers(3, VOCAB, 21))


@pytest.fixture(scope="module")
def llama_model():
    return hf_model("llama")


@pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
def test_llama_gguf_of_every_tensor_type_matches_transformers(tensor_type, llama_model, tmp_path):
    path = write_gguf(llama_model, tmp_path / f"llama-{tensor_type}.gguf", tensor_type, sentencepiece_vocab())
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {tensor_type, "F32"}  # F32: norms
    assert_close(ferrum_logits(path, TOKENS), transformers_logits(path, TOKENS))


@pytest.mark.parametrize("tensor_type", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_gguf_loaded_as_int4_keeps_its_codes(tensor_type, llama_model, tmp_path):
    """`quantization="int4"` on a Q4_0/Q4_1/Q4_K file takes the file's 4-bit codes and scales as
    int4 groups of 32 (Q4_K's repacked): the logits are transformers' on the same file (its own
    dequantization), as close as the float load's; a requantization would move them further."""
    from ferrum_jax.executor.loading import _holds_blocks_of
    from ferrum_jax.models.gguf_file import open_gguf
    from ferrum_jax.models.gguf_weights import GGUFCheckpoint

    path = write_gguf(llama_model, tmp_path / f"llama-{tensor_type}.gguf", tensor_type, sentencepiece_vocab())
    ckpt = GGUFCheckpoint(open_gguf(path), {"model_type": "llama", **llama_model.config.to_dict()})
    assert _holds_blocks_of(ckpt, "int4") and not _holds_blocks_of(ckpt, "int8")
    assert_close(ferrum_logits(path, TOKENS, quantization="int4"), transformers_logits(path, TOKENS))


def our_weight(ex, path: str, layer: int) -> np.ndarray:
    """One layer's weight of a quantized executor as HF's `[out, in]` float64, dequantized here
    from its codes (int8 per group, or int4 nibbles: a group's first half low, second half high)."""
    flat = {k: np.asarray(v) for k, v in flatten_state(ex._state).items()}
    codes, scale = flat[path + ".weight"][layer], flat[path + ".scale"][layer].astype(np.float64)
    groups, outs = scale.shape[0], int(np.prod(codes.shape[declarations(ex.cfg)[path + ".weight"].n_in :]))
    if codes.dtype == np.int8:
        w = codes.reshape(groups, -1, outs) * scale.reshape(groups, 1, outs)
    else:
        b = codes.reshape(groups, -1, outs).astype(np.int64)
        step, offset = scale[:, 0].reshape(groups, 1, outs), scale[:, 1].reshape(groups, 1, outs)
        w = np.concatenate([b & 0xF, b >> 4], axis=1) * step + offset
    return w.reshape(-1, outs).T


def test_q8_0_gguf_loaded_as_int8_keeps_its_codes(llama_model, tmp_path):
    """`quantization="int8"` on a Q8_0 file takes its int8 codes and per-32 scales as grouped int8:
    the weights are the gguf package's dequantization of the file exactly (per-channel int8 would
    requantize them), and the logits transformers' on the same file."""
    from ferrum_jax.models.gguf_file import open_gguf
    from ferrum_jax.models.gguf_weights import GGUFCheckpoint

    path = write_gguf(llama_model, tmp_path / "llama-Q8_0.gguf", "Q8_0", sentencepiece_vocab())
    ex = fj.JaxModelExecutor.from_pretrained(path, progress=False, quantization="int8", **LIMITS)
    assert ex.quantization == Quantization("int8", 32)
    ckpt = GGUFCheckpoint(open_gguf(path), {"model_type": "llama", **llama_model.config.to_dict()})
    np.testing.assert_array_equal(our_weight(ex, "layers.mlp.down", 1), ckpt.read("model.layers.1.mlp.down_proj.weight"))
    q = our_weight(ex, "layers.attn.wq", 0)
    np.testing.assert_array_equal(q.reshape(q.shape[0], -1), ckpt.read("model.layers.0.self_attn.q_proj.weight"))
    tokens = TOKENS
    assert_close(ferrum_logits(path, tokens, quantization="int8"), transformers_logits(path, tokens))


def test_a_mixed_q4_k_m_style_gguf_keeps_its_q4_k_codes_as_int4(llama_model, tmp_path):
    """A file mixing Q4_K and Q6_K (as llama.cpp's Q4_K_M does: attn_v everywhere, ffn_down in one
    layer) loads with int4 in groups of 32: the Q4_K tensors exactly as the file holds them, the
    Q6_K ones quantized to int4 (within half a step of the file's values)."""
    from ferrum_jax.models.gguf_file import open_gguf
    from ferrum_jax.models.gguf_weights import GGUFCheckpoint

    mixed = {"attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}
    path = write_gguf(llama_model, tmp_path / "llama-Q4_K_M.gguf", "Q4_K", sentencepiece_vocab(), mixed=mixed)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q6_K" and kinds["blk.1.ffn_down.weight"] == "Q4_K"
    ex = fj.JaxModelExecutor.from_pretrained(path, progress=False, quantization="int4", **LIMITS)
    assert ex.quantization == Quantization("int4", 32)
    ckpt = GGUFCheckpoint(open_gguf(path), {"model_type": "llama", **llama_model.config.to_dict()})
    np.testing.assert_array_equal(our_weight(ex, "layers.mlp.down", 1), ckpt.read("model.layers.1.mlp.down_proj.weight"))
    for layer, hf in ((0, "model.layers.0.mlp.down_proj.weight"), (1, "model.layers.1.self_attn.v_proj.weight")):
        path_ = "layers.mlp.down" if "down" in hf else "layers.attn.wv"
        ours, file = our_weight(ex, path_, layer).reshape(ckpt.read(hf).shape), ckpt.read(hf)
        groups = file.reshape(file.shape[0], -1, 32)
        half_step = (groups.max(-1) - groups.min(-1)) / 15 / 2
        assert (np.abs(ours - file).reshape(groups.shape) <= half_step[..., None] + 1e-6).all(), hf
    # Against transformers' float reading of the file, closer than regrouping every tensor by 64.
    ref = transformers_logits(path, TOKENS)
    kept = np.abs(ferrum_logits(path, TOKENS, quantization="int4") - ref).max() / np.abs(ref).max()
    regrouped = np.abs(ferrum_logits(path, TOKENS, quantization=Quantization("int4", 64)) - ref).max() / np.abs(ref).max()
    print(f"mixed Q4_K/Q6_K file as int4, max |logit diff| / max |logit|: file groups {kept:.3f}, regrouped by 64 {regrouped:.3f}")
    assert kept < regrouped


# transformers' GGUF config for qwen3 ignores the head size key, so its head_dim is Qwen3's own 128.
QWEN3_HEADS = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)


@pytest.mark.parametrize("kind,tensor_type", [("qwen2", "Q8_0"), ("qwen2", "Q4_K"), ("qwen3", "Q6_K")])
def test_qwen_gguf_matches_transformers(kind, tensor_type, tmp_path):
    model = hf_model(kind, **(QWEN3_HEADS if kind == "qwen3" else {}))
    path = write_gguf(model, tmp_path / f"{kind}.gguf", tensor_type, byte_level_vocab())
    assert_close(ferrum_logits(path, TOKENS), transformers_logits(path, TOKENS))


def gemma2_model(**caps) -> transformers.PreTrainedModel:
    """head_dim 256, where llama.cpp's query scale (head_dim ** -0.5, which ferrum takes from such
    a file) and the query_pre_attn_scalar default of transformers' GGUF loader agree; windows of 8
    cut into the 21 tokens."""
    return hf_model("gemma2", head_dim=256, num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                    tie_word_embeddings=True, **caps)  # fmt: skip


def test_gemma2_f32_gguf_matches_the_hf_model_it_came_from(tmp_path):
    """Gemma 2 as llama.cpp writes it: norms stored as w + 1, the window and soft-caps in the
    metadata (small caps here, so they bend the scores). The model the file came from is the
    oracle: transformers' GGUF loader ignores the soft-cap keys and takes Gemma 2's defaults."""
    model = gemma2_model(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    path = write_gguf(model, tmp_path / "gemma2.gguf", "F32", sentencepiece_vocab())
    with torch.inference_mode():
        assert_close(ferrum_logits(path, TOKENS), model(torch.tensor([TOKENS])).logits[0].numpy())


def test_gemma2_q8_0_gguf_matches_transformers(tmp_path):
    """Gemma 2's default soft-caps (50, 30), which llama.cpp writes and transformers assumes."""
    path = write_gguf(gemma2_model(), tmp_path / "gemma2.gguf", "Q8_0", sentencepiece_vocab())
    assert_close(ferrum_logits(path, TOKENS), transformers_logits(path, TOKENS))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_float_gguf_matches_the_hf_model_it_came_from(kind, llama_model, tmp_path):
    """An F32 file holds the HF weights exactly: the model they came from is an oracle too,
    independent of transformers' GGUF loader (q/k permutation and names undone here). Mistral
    is written as llama.cpp writes it, under the `llama` architecture."""
    model = llama_model if kind == "llama" else hf_model("mistral", sliding_window=None)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", sentencepiece_vocab())
    with torch.inference_mode():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert_close(ferrum_logits(path, TOKENS), ref)


@pytest.mark.parametrize("kind,experts_type", [("qwen3_moe", "F32"), ("qwen3_moe", "Q8_0"), ("mixtral", "Q8_0")])
def test_moe_gguf_matches_the_hf_model_it_came_from(kind, experts_type, tmp_path):
    """MoE files as llama.cpp's converter writes them: each layer's experts one tensor
    `ffn_{gate,up,down}_exps [experts, out, in]` (F32, or Q8_0 blocks along the inputs), the
    router `ffn_gate_inp`, expert count and top-k as metadata; Qwen3-MoE as `qwen3moe` with its
    expert width, Mixtral as `llama` (q/k rows permuted). The model it came from is the oracle,
    its experts replaced by the file's dequantized ones: transformers' GGUF loader maps neither
    Qwen3-MoE's `expert_feed_forward_length` nor the renormalized top-k llama.cpp applies to every
    qwen3moe model."""
    experts = dict(num_experts_per_tok=2, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**{**SHAPE, **experts}, moe_intermediate_size=256, num_experts=4, norm_topk_prob=True)
    else:
        config = transformers.MixtralConfig(**{**SHAPE, **experts}, num_local_experts=4, sliding_window=None)
    config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # routing that separates the experts, yet leaves the top 2 short of all the mass
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(5.0)
    path = write_gguf(model, tmp_path / f"{kind}.gguf", "F32", sentencepiece_vocab(), mixed={"_exps.weight": experts_type})
    stacks = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
              for t in gguf.GGUFReader(str(path)).tensors if "_exps" in t.name}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate_up = np.concatenate([stacks[f"blk.{i}.ffn_gate_exps.weight"], stacks[f"blk.{i}.ffn_up_exps.weight"]], axis=1)
            layer.mlp.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
            layer.mlp.experts.down_proj.copy_(torch.from_numpy(stacks[f"blk.{i}.ffn_down_exps.weight"].copy()))
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert_close(ferrum_logits(path, TOKENS), ref)


def test_llama3_rope_scaling_from_the_rope_freqs_tensor(tmp_path):
    """Llama 3.1 files carry their RoPE scaling as per-frequency divisors (llama.cpp's
    `rope_freqs`), computed here from the HF config the way llama.cpp's converter does."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    model = hf_model("llama", rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    divisors = []
    for freq in base:
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4.0:
            divisors.append(1.0)
        elif wavelen > 8192 / 1.0:
            divisors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
    path = write_gguf(model, tmp_path / "llama31.gguf", "F32", sentencepiece_vocab(), rope_freqs=np.array(divisors))
    tokens = TOKENS * 3  # past 32 positions, where the scaled low frequencies differ from plain RoPE
    with torch.inference_mode():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    assert_close(ferrum_logits(path, tokens), ref)
    assert fj.JaxModelExecutor.from_pretrained(path, progress=False, **LIMITS).cfg.rope.rope_type == "llama3"


@pytest.mark.parametrize("vocab", [sentencepiece_vocab, byte_level_vocab], ids=["sentencepiece", "byte_level"])
def test_tokenizer_from_gguf_matches_transformers(vocab, llama_model, tmp_path):
    path = write_gguf(llama_model, tmp_path / "tok.gguf", "Q8_0", vocab())
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(tmp_path)  # a directory holding one .gguf
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.vocab_size == len(ref) == VOCAB
    assert fj.JaxModelExecutor.from_pretrained(tmp_path, progress=False, **LIMITS).info().model_id == "tok"


def test_convert_keeps_the_source_dtype(llama_model, tmp_path):
    from ferrum_jax import convert

    q = write_gguf(llama_model, tmp_path / "q.gguf", "Q4_K", sentencepiece_vocab())
    half = write_gguf(llama_model, tmp_path / "h.gguf", "F16", sentencepiece_vocab())
    llama_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert (source_dtype(q), source_dtype(half), source_dtype(tmp_path / "hf")) == ("float32", "float16", "float32")

    convert.main([str(q), str(tmp_path / "orbax")])
    assert json.loads((tmp_path / "orbax" / "ferrum_checkpoint.json").read_text())["dtype"] == "float32"
    np.testing.assert_array_equal(ferrum_logits(tmp_path / "orbax", TOKENS), ferrum_logits(q, TOKENS))
    convert.main([str(tmp_path / "hf"), str(tmp_path / "from_hf")])
    assert json.loads((tmp_path / "from_hf" / "ferrum_checkpoint.json").read_text())["dtype"] == "float32"
    convert.main([str(tmp_path / "hf"), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "bf16" / "ferrum_checkpoint.json").read_text())["dtype"] == "bfloat16"


def test_bad_gguf_files_are_clear_errors(llama_model, tmp_path):
    good = write_gguf(llama_model, tmp_path / "good.gguf", "Q8_0", sentencepiece_vocab()).read_bytes()

    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
    with pytest.raises(fj.InvalidConfigError, match=r"cut\.gguf is not a readable GGUF file"):
        fj.JaxModelExecutor.from_pretrained(tmp_path / "cut.gguf", **LIMITS)

    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good[4:])
    with pytest.raises(fj.InvalidConfigError, match=r"magic\.gguf is not a readable GGUF file.*magic"):
        fj.JaxModelExecutor.from_pretrained(tmp_path / "magic.gguf", **LIMITS)

    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(fj.UnsupportedError, match=r"token_embd\.weight: IQ2_XXS.*supported: \['F32'.*'Q6_K'\]"):
        fj.JaxModelExecutor.from_pretrained(tmp_path / "iq.gguf", **LIMITS)

    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(fj.UnsupportedError, match=r"GGUF architecture 'gemma'.*supported: \['gemma2', 'gemma3', 'llama', 'mistral', 'qwen2', 'qwen3', 'qwen3moe'\]"):
        fj.JaxModelExecutor.from_pretrained(tmp_path / "gemma.gguf", **LIMITS)
    with pytest.raises(fj.UnsupportedError, match=r"tokenizer\.ggml\.model=None.*supported: 'gpt2'"):
        load_tokenizer(tmp_path / "gemma.gguf")


@pytest.mark.parametrize("tensor_type", ["F16", "BF16", "Q4_1", "Q6_K"])
def test_header_parser_reads_what_the_gguf_package_reads(llama_model, tmp_path, tensor_type):
    """Our memory-map header parser against the `gguf` package's reader (the oracle): every
    metadata value, every tensor's type and shape, every dequantized value."""
    from ferrum_jax.models.gguf_file import GGUFFile

    path = write_gguf(llama_model, tmp_path / "m.gguf", tensor_type, sentencepiece_vocab())
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's pseudo-fields of the header
    assert sorted(keys) == sorted(ours._fields)
    assert {k: ours.get(k) for k in keys} == {k: ref.fields[k].contents() for k in keys}
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        assert (ours.tensors[t.name].type_name, ours.tensors[t.name].shape) == (t.tensor_type.name, tuple(reversed(t.shape)))
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name].shape)
        np.testing.assert_array_equal(ours.dequantize(t.name), expected)
