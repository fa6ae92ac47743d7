"""Gemma 2 and Gemma 3 against HuggingFace transformers on the same checkpoint files.

Tiny random models built by transformers from configs (`save_pretrained`), chosen so each Gemma
feature changes the logits: windows (8) shorter than the prompts, soft-caps small enough that
tanh bends the scores and logits, `query_pre_attn_scalar` != head_dim, norms moved off zero
(Gemma's weights are offsets from one), local and global RoPE bases apart with linear scaling on
the global layers, and local:global patterns with several loop shapes (models.layer_loops).
Logits are compared at TP 1 and TP 2 (one KV head, as Gemma 3 270M has: TP 2 replicates it),
through the XLA path and the Pallas kernels (in interpret mode on CPU: `attention="pallas"`).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import transformers

import ferrum_jax as fj
from executor_runs import prefill_then_decode
from ferrum_jax.models.layer_loops import layer_loops
from ferrum_jax.models.registry import declarations, model_config
import gemma_models
from gemma_models import COMMON, CONFIGS, build, gemma3, hf_logits

LIMITS = dict(dtype="float32", page_size=8, max_batch_size=2, max_sequence_length=64, max_num_batched_tokens=64)
PROMPT_LEN = 30
REL_TOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def gemma(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp("gemma"))


def prompt(n: int = PROMPT_LEN) -> np.ndarray:
    return gemma_models.prompt(n)


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= REL_TOL, f"rel err {err:.2e}"


@pytest.mark.parametrize("tp, attention", [(1, "xla"), (2, "xla"), (1, "pallas"), (2, "pallas")])
def test_gemma_logits_match_hf(gemma, tp, attention):
    """Prefill of 30 tokens (windows of 8 cut into it), then 6 decode steps past the window."""
    path, model = gemma
    ids = prompt()
    decode = np.random.default_rng(7).integers(3, 300, size=6).astype(np.int32)
    full = np.concatenate([ids[0], decode])[None]
    want = hf_logits(model, full)
    ex = fj.JaxModelExecutor.from_pretrained(path, tensor_parallel_size=tp, attention=attention, **LIMITS)
    pre, steps = prefill_then_decode(ex, ids, decode)
    assert_close(pre, want[:PROMPT_LEN])
    # Decode step i consumed decode[i]: its logits are HF's at position PROMPT_LEN + i.
    assert_close(steps, want[PROMPT_LEN:])


def test_gemma_greedy_matches_hf_generate(gemma):
    path, model = gemma
    ids = prompt(20)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t = torch.from_numpy(ids.astype(np.int64))
        want = model.generate(t, attention_mask=torch.ones_like(t), generation_config=gen)[0, 20:].numpy()
    ex = fj.JaxModelExecutor.from_pretrained(path, **LIMITS)

    async def go():
        out = await ex.prefill(fj.PrefillInput(input_ids=ids))
        handle, tok, got = out.kv_cache, int(np.argmax(out.last_token_logits()[0])), []
        for _ in range(16):
            got.append(tok)
            d = await ex.decode(fj.DecodeInput(input_ids=np.array([[tok]], np.int32), kv_cache=handle))
            handle, tok = d.kv_cache, int(np.argmax(np.asarray(d.logits)[0]))
        return np.array(got)

    np.testing.assert_array_equal(asyncio.run(go()), want)


def test_parameter_count_equals_hf(gemma):
    path, model = gemma
    ex = fj.JaxModelExecutor.from_pretrained(path, **LIMITS)
    assert ex.info().num_parameters == sum(p.numel() for p in model.parameters())


def test_gemma3_27b_layer_loops():
    """Gemma-3-27B's 62 layers, 5 local : 1 global: two loops (ten 6-layer blocks, then two
    local layers), not one per run of equal layers (21)."""
    cfg = model_config(_gemma3_27b_config())
    kinds = [(cfg.sliding_windows[i], cfg.layer_rope(i)) for i in range(cfg.num_layers)]
    loops = layer_loops(kinds)
    assert [(lp.first, lp.count, len(lp.block)) for lp in loops] == [(0, 10, 6), (60, 2, 1)]
    assert sum(lp.count * len(lp.block) for lp in loops) == 62
    # The hand count of the 27B text model's parameters (vocab 262208, tied): 27.0e9.
    d, f, hq, hk, hd, v, n = 5376, 21504, 32, 16, 128, 262208, 62
    per_layer = d * hd * (2 * hq + 2 * hk) + 3 * d * f + 4 * d + 2 * hd
    assert declarations(cfg).num_parameters() == n * per_layer + v * d + d


def _gemma3_27b_config() -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "configs" / "models" / "gemma-3-27b" / "config.json").read_text())


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "chunked_attention"),
        ({"hidden_activation": "relu"}, "relu"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "yarn"),
    ],
)
def test_unimplemented_gemma_options_are_refused_by_name(patch, message):
    base = {"architectures": ["Gemma3ForCausalLM"], **COMMON, "num_hidden_layers": 2, "num_key_value_heads": 1}
    with pytest.raises(fj.FerrumError, match=message):
        model_config({**base, **patch})


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(fj.FerrumError, match="Gemma3ForCausalLM") as err:
        model_config({"architectures": ["FalconForCausalLM"]})
    assert "'FalconForCausalLM' is not supported" in str(err.value)


def test_gemma3_image_text_checkpoint_serves_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (text config nested, the text model under
    `model.language_model.`, a vision tower beside it): its text model loads, the vision tensors
    are skipped, and text-only logits equal transformers' for the whole model."""
    text = gemma3(6, 3)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(pname))))
    model.save_pretrained(tmp_path / "mm", safe_serialization=True)
    ids = prompt()
    want = hf_logits(model, ids)
    ex = fj.JaxModelExecutor.from_pretrained(tmp_path / "mm", **LIMITS)
    assert ex.cfg.architecture == "gemma3" and ex.cfg.vocab_size == want.shape[-1]
    assert_close(np.asarray(asyncio.run(ex.prefill(fj.PrefillInput(input_ids=ids))).logits)[0], want)
