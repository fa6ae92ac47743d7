"""Checkpoint loading: sharded safetensors, bf16 tensors, one error for every mismatch,
config parsing (both rope spellings, unsupported options), and sliding-window models
against HF (the oracle)."""

from __future__ import annotations

import asyncio
import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import ferrum_jax as fj
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.registry import model_config, model_config_from_dir
from ferrum_jax.models.safetensors_reader import SafetensorsDir

LIMITS = dict(dtype="float32", max_batch_size=2, max_sequence_length=64, page_size=8, max_num_batched_tokens=64)
COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2)


def run(coro):
    return asyncio.run(coro)


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def hf_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()


def seeded(config):
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_sharded_checkpoint_loads_like_hf(tmp_path):
    model = seeded(transformers.LlamaConfig(**COMMON))
    path = save(model, tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    ex = fj.JaxModelExecutor.from_pretrained(path, **LIMITS)
    toks = np.arange(1, 30, dtype=np.int32)
    out = run(ex.prefill(fj.PrefillInput(input_ids=toks[None])))
    ref = hf_logits(model, toks)
    assert np.abs(out.logits[0] - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize(
    "config",
    [
        transformers.MistralConfig(**COMMON, sliding_window=8),
        transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ],
    ids=["mistral_window8", "qwen2_window6_from_layer1"],
)
def test_sliding_window_models_match_hf(tmp_path, config):
    """Windows far shorter than the prompt, so a model ignoring them would diverge."""
    model = seeded(config)
    path = save(model, tmp_path / "sw")
    windows = model_config_from_dir(path).sliding_windows
    assert any(windows)
    ex = fj.JaxModelExecutor.from_pretrained(path, **LIMITS)
    toks = np.random.default_rng(0).integers(0, 256, 40).astype(np.int32)
    out = run(ex.prefill(fj.PrefillInput(input_ids=toks[None, :30])))
    ref = hf_logits(model, toks)
    assert np.abs(out.logits[0] - ref[:30]).max() <= 1e-4 * np.abs(ref).max()
    h = out.kv_cache
    for t in range(30, 40):  # decode past several windows
        d = run(ex.decode(fj.DecodeInput(input_ids=toks[None, t : t + 1], kv_cache=h)))
    assert np.abs(d.logits[0] - ref[39]).max() <= 1e-4 * np.abs(ref).max()


def test_every_mismatch_is_reported_in_one_error(tmp_path):
    model = seeded(transformers.LlamaConfig(**COMMON))
    path = save(model, tmp_path / "broken")
    ckpt = SafetensorsDir(path)
    tensors = {name: np.array(ckpt.read(name)) for name in ckpt.entries}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    tensors["model.extra_thing.weight"] = np.zeros(2, np.float32)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(fj.InvalidConfigError) as err:
        fj.JaxModelExecutor.from_pretrained(path, **LIMITS)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing 1" in msg
    assert "unexpected 1" in msg and "model.extra_thing.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: shape [3, 64], expected [32, 64]" in msg


def test_bfloat16_tensors_read_exactly(tmp_path):
    values = torch.randn(5, 7).to(torch.bfloat16)
    from safetensors.torch import save_file as save_torch

    save_torch({"x": values}, str(tmp_path / "model.safetensors"))
    got = SafetensorsDir(tmp_path).read("x")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), values.float().numpy())


def test_rope_spellings_parse_identically():
    v4 = {"architectures": ["LlamaForCausalLM"], **COMMON, "rope_theta": 5e5,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    v5 = {"architectures": ["LlamaForCausalLM"], **COMMON,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    a, b = model_config(v4), model_config(v5)
    assert a == b and a.rope.rope_type == "llama3" and a.rope.theta == 5e5


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"architectures": ["FalconForCausalLM"]}, "'FalconForCausalLM' is not supported"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ],
)
def test_unsupported_options_are_named(patch, needle):
    with pytest.raises(fj.FerrumError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        model_config({"architectures": ["LlamaForCausalLM"], **COMMON, **patch})


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(fj.InvalidConfigError, match="no config.json"):
        fj.JaxModelExecutor.from_pretrained(tmp_path, **LIMITS)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **COMMON}))
    with pytest.raises(fj.InvalidConfigError, match="no \\*.safetensors"):
        fj.JaxModelExecutor.from_pretrained(tmp_path, **LIMITS)
