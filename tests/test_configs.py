"""Every file of `configs/` is usable as what it claims to be.

Model presets (a `model` mapping: tiny, bench_125m) load with `load_preset`, and the
~125M benchmark model has ~125M parameters and builds an executor. Serving configs (the
rest) parse with the server's own settings parser once their placeholder model is given
(and are refused without it), their engine limits are consistent, the model they are
written for divides over their tensor-parallel size, and the memory arithmetic in their
comments holds: weights + KV pool + the activation reserve fit each device. The published
architectures of those models (Llama-3-8B/70B) stand in for their checkpoints here.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import ferrum_jax as fj
from ferrum_jax.executor.presets import CONFIG_DIR, load_preset
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.registry import declarations, model_config_from_dir
from ferrum_jax.models.sharding import check_divisible, kv_heads_sharded
from ferrum_jax.serve.loading import ModelSource, model_presets
from ferrum_jax.serve.settings import parse_settings

GiB = 2**30
# The published architectures, as config.json files the aot tool compiles from too.
LLAMA3_8B = model_config_from_dir(CONFIG_DIR / "models" / "llama-3-8b")
LLAMA3_70B = model_config_from_dir(CONFIG_DIR / "models" / "llama-3-70b")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a serving config is written for: the model and one device's usable memory."""

    model: ModelConfig
    device_bytes: float
    activation_reserve_bytes: float


# The figures of the configs' comments: H100 80 GB = 79.6 GiB usable, of which JAX takes its
# default 75%; a v5p chip has 95 GiB; of a v6e chip's 32 GiB ferrum_jax.aot counts 95%. The
# reserves cover the largest program's temporaries and outputs (`python -m ferrum_jax.aot`).
TARGETS = {
    "llama3_8b_gpu": Target(LLAMA3_8B, 0.75 * 79.6 * GiB, 4 * GiB),
    "llama3_70b_tpu_v5p8": Target(LLAMA3_70B, 95 * GiB, 5 * GiB),
    "llama3_8b_tpu_v6e1": Target(LLAMA3_8B, 0.95 * 32 * GiB, 0.5 * GiB),
    "llama3_70b_tpu_v6e8": Target(LLAMA3_70B, 0.95 * 32 * GiB, 0.5 * GiB),
}
V5E_CHIP_BYTES = 16 * GiB


def _raw(path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


ALL = sorted(CONFIG_DIR.glob("*.yaml"))
PRESETS = [p for p in ALL if isinstance(_raw(p).get("model"), dict)]
SERVING = [p for p in ALL if p not in PRESETS]


def test_the_directory_holds_both_kinds():
    assert {p.stem for p in PRESETS} >= {"tiny", "bench_125m"} and set(model_presets()) == {p.stem for p in PRESETS}
    assert {p.stem for p in SERVING} >= {"serve_cpu", *TARGETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_model_presets_load(path):
    preset = load_preset(path.stem)
    assert preset.model.vocab_size >= 320, "presets are served with the 320-id byte tokenizer"
    assert preset.model.num_heads % preset.model.num_kv_heads == 0
    assert set(preset.executor_options) <= {"page_size", "max_batch_size", "max_sequence_length", "num_pages", "max_num_batched_tokens"}
    assert preset.executor_options.get("max_sequence_length", 0) <= preset.model.max_position_embeddings


def test_bench_125m_has_about_125m_parameters_and_builds():
    n = declarations(load_preset("bench_125m").model).num_parameters()
    assert 120e6 <= n <= 130e6, n
    ex = fj.JaxModelExecutor.from_preset("bench_125m", max_batch_size=1, max_sequence_length=32, num_pages=4, max_num_batched_tokens=16)
    assert (ex.info().num_parameters, ex.cfg.vocab_size, ex.cfg.hidden_size) == (n, 32000, 768)


def test_presets_are_named_by_the_serve_flags():
    assert parse_settings(["--preset", "bench_125m"]).preset == "bench_125m"
    assert ModelSource.parse("tiny") == ModelSource(preset="tiny")
    assert ModelSource.parse("preset:tiny:7") == ModelSource(preset="tiny", seed=7)
    for bad in ("preset:llama3_8b_gpu", "preset:nope", "preset:tiny:x"):
        with pytest.raises(fj.FerrumError):
            ModelSource.parse(bad)


def test_model_and_preset_exclude_each_other_and_a_flag_replaces_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--model", "/m", "--preset", "tiny"])
    path = tmp_path / "serve.yaml"
    path.write_text("model: /from/file\n")
    s = parse_settings(["--config", str(path), "--preset", "bench_125m"])
    assert (s.model, s.preset) == (None, "bench_125m")
    path.write_text("model: /from/file\npreset: tiny\n")
    with pytest.raises(SystemExit):
        parse_settings(["--config", str(path)])
    assert "mutually exclusive" in capsys.readouterr().err


@pytest.mark.parametrize("path", SERVING, ids=lambda p: p.stem)
def test_serving_configs_parse_and_are_consistent(path, capsys):
    placeholder = str(_raw(path).get("model", "")).startswith("<")
    if placeholder:
        with pytest.raises(SystemExit):
            parse_settings(["--config", str(path)])
        assert "must be replaced" in capsys.readouterr().err
    s = parse_settings(["--config", str(path), *(["--model", "/path/to/checkpoint"] if placeholder else [])])
    if s.max_num_seqs and s.max_num_batched_tokens:
        assert s.max_num_batched_tokens >= max(16, s.max_num_seqs)
    if s.num_pages and s.max_model_len:
        assert (s.num_pages - 1) * (s.page_size or 16) >= s.max_model_len, "one full-length sequence must fit"


def _per_device_bytes(cfg: ModelConfig, tp: int, num_pages: int, page_size: int, dtype_bytes: int = 2) -> tuple[float, float]:
    """(weights, KV pool) bytes on each device under the executor's sharding: everything
    split tp ways except norms and, when tp exceeds the KV heads, the replicated k/v."""
    kv_weights = cfg.num_layers * 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
    kv_split = tp if kv_heads_sharded(cfg, tp) else 1
    weights = ((declarations(cfg).num_parameters() - kv_weights) / tp + kv_weights / kv_split) * dtype_bytes
    kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes * cfg.num_layers / kv_split
    return weights, num_pages * page_size * kv_per_token


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_serving_configs_fit_their_hardware(name):
    target = TARGETS[name]
    s = parse_settings(["--config", str(CONFIG_DIR / f"{name}.yaml"), "--model", "/path/to/checkpoint"])
    assert s.dtype == "bfloat16" and s.max_model_len <= target.model.max_position_embeddings
    check_divisible(target.model, s.tensor_parallel_size)
    weights, kv = _per_device_bytes(target.model, s.tensor_parallel_size, s.num_pages, s.page_size)
    assert weights + kv + target.activation_reserve_bytes <= target.device_bytes, (weights / GiB, kv / GiB)


def test_llama3_70b_does_not_fit_a_v5e_8_in_bf16():
    # Why the 70B config is for v5p-8: on v5e-8 the weights alone overflow each chip.
    weights, _ = _per_device_bytes(LLAMA3_70B, 8, 0, 16)
    assert weights > V5E_CHIP_BYTES
