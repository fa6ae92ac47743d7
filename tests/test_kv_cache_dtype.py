"""`kv_cache_dtype="int8"|"fp8"`: one-byte KV pages with calibrated per-(layer, KV head) scales
through the whole step (tiny preset, XLA path) and in the compile-only TPU tool. Oracles: the
float-KV executor (a stated bound on the logits; its own pages for the calibrated scales), the
byte counts by hand, perplexity of the default model, XLA's memory analysis."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.interfaces.errors import FerrumError
from test_quantization import TEXT, all_logits, perplexity

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(dtype="float32", max_batch_size=2, max_sequence_length=128, max_num_batched_tokens=64)


def test_fp8_kv_step_stays_close_to_float_kv_and_takes_a_quarter_of_float32():
    base = fj.JaxModelExecutor.from_preset("tiny", **LIMITS)
    fp8 = fj.JaxModelExecutor.from_preset("tiny", kv_cache_dtype="fp8", **LIMITS)
    assert fp8.kv_dtype == jnp.float8_e4m3fn and fp8._kv.k.dtype == jnp.float8_e4m3fn
    cfg = base.cfg
    assert fp8.memory_requirements().kv_cache_memory_per_token == 2 * cfg.num_kv_heads * cfg.head_dim * 1
    assert base.memory_requirements().kv_cache_memory_per_token == 4 * fp8.memory_requirements().kv_cache_memory_per_token
    ids = list(range(7, 90))
    a, b = all_logits(base, ids), all_logits(fp8, ids)
    # Random weights give the worst case for 3 mantissa bits: logits of magnitude 1-3 moved by
    # at most 0.31 when measured; the kernels' own exactness on fp8 pages is
    # tests/attention_kernels/test_fp8_pages.py, the quality on a real model the test below.
    assert np.abs(a - b).max() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_int8_kv_step_stays_close_to_float_kv():
    base = fj.JaxModelExecutor.from_preset("tiny", **LIMITS)
    int8 = fj.JaxModelExecutor.from_preset("tiny", kv_cache_dtype="int8", **LIMITS)
    assert int8._kv.k.dtype == jnp.int8 and int8._kv.k_scale.shape == (base.cfg.num_kv_heads, base.cfg.num_layers)
    assert int8.memory_requirements().kv_cache_memory_per_token * 4 == base.memory_requirements().kv_cache_memory_per_token
    ids = list(range(7, 90))
    a, b = all_logits(base, ids), all_logits(int8, ids)
    # int8 rounds each head to 1/254 of its calibrated range; measured: logits moved by <= 0.13.
    assert np.abs(a - b).max() < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_scales_map_the_float_models_largest_kv_to_the_types_largest_value(kv):
    """The calibration prompt run through the float-KV executor (its ordinary prefill, its own
    pages): each (layer, KV head)'s largest |K| and |V| times HEADROOM is what the scale maps to
    127 (int8) or 448 (e4m3)."""
    from ferrum_jax.kv.calibration import HEADROOM, calibration_tokens

    base = fj.JaxModelExecutor.from_preset("tiny", **{**LIMITS, "max_sequence_length": 512, "max_num_batched_tokens": 512})
    narrow = fj.JaxModelExecutor.from_preset("tiny", kv_cache_dtype=kv, **LIMITS)
    h = base.new_kv_cache()
    base.extend([(h, calibration_tokens(base.cfg).tolist())], "last")
    (pages,) = (np.asarray(t) for t in base._seqs.lookup(h).tables)  # one KV group: slot = layer
    layers = base.cfg.num_layers
    for pool, scale in ((base._kv.k, narrow._kv.k_scale), (base._kv.v, narrow._kv.v_scale)):
        per_layer = np.asarray(pool).reshape(pool.shape[0], layers, -1, *pool.shape[2:])[:, :, pages]
        amax = np.abs(per_layer).max(axis=(2, 3, 4))
        limit = 127 if kv == "int8" else 448
        np.testing.assert_allclose(np.asarray(scale) * limit, amax * HEADROOM, rtol=1e-4)


def test_narrow_kv_perplexity_of_the_default_model():
    """Measured: 20.32 with float32 pages, 20.17 with int8 (-0.7%), 20.37 with fp8 (+0.3%;
    20.50 before fp8 had scales)."""
    from ferrum_jax.serve.tokenizer import load_tokenizer

    ids = load_tokenizer(fj.default_model_path()).encode(TEXT.read_text(), add_special_tokens=False)
    limits = dict(dtype="float32", max_batch_size=1, max_sequence_length=512, max_num_batched_tokens=512, progress=False)
    ppl = {kv: perplexity(fj.JaxModelExecutor.from_pretrained(fj.default_model_path(), kv_cache_dtype=kv, **limits), ids)
           for kv in ("auto", "int8", "fp8")}  # fmt: skip
    assert ppl["int8"] / ppl["auto"] < 1.01 and ppl["fp8"] / ppl["auto"] < 1.01, ppl


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(FerrumError, match="kv_cache_dtype 'int3'"):
        fj.JaxModelExecutor.from_preset("tiny", kv_cache_dtype="int3", **LIMITS)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (make test installs it)")
def test_aot_counts_one_byte_pages_at_half_the_bfloat16_bytes(tmp_path):
    def pool(*flags):
        out = tmp_path / f"r{len(flags)}.json"
        run = subprocess.run(
            [sys.executable, "-m", "ferrum_jax.aot", "--target", "tpu-v6e-1", "--model", str(REPO / "configs/models/llama-3-8b"),
             "--max-model-len", "8192", "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--num-pages", "2048",
             "--programs", "logits_last", "--json", str(out), *flags],
            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        report = json.loads(out.read_text())
        assert run.returncode == 0 and report["fits"] and report["kv_pool_copies"] == 0, run.stdout + run.stderr[-2000:]
        return report

    bf16 = pool()
    for kv in ("fp8", "int8"):
        narrow = pool("--kv-cache-dtype", kv)
        assert narrow["kv_pool_bytes_per_device"] * 2 == bf16["kv_pool_bytes_per_device"]
        assert narrow["max_num_pages"] > 1.9 * bf16["max_num_pages"]
