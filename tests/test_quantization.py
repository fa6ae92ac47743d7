"""Weight-only int8 / int4 quantization: the stored integers and scales against a numpy
oracle written here (round to nearest, symmetric, nibbles unpacked by hand), the quantized
step against a float step over the same dequantized weights (tight tolerance), tensor
parallelism and orbax round trips equal to one device, and quality on the default model:
perplexity over a fixed English text (tests/data/perplexity_text.txt) in float32, int8, int4."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ferrum_jax as fj
from ferrum_jax.executor.jax_executor import JaxModelExecutor
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models import int4_codes
from ferrum_jax.models.param_tree import abstract_model, flatten_state, unflatten_into
from ferrum_jax.models.declare import SCALE, scale_path
from ferrum_jax.models.quantization import Quantization, project, quantize
from ferrum_jax.models.registry import declarations

LIMITS = dict(dtype="float32", max_batch_size=2, max_sequence_length=128, max_num_batched_tokens=64)
TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"


def unpack_groups(packed: np.ndarray, n_in: int, groups: int) -> np.ndarray:
    """int4 values `[groups, group, out...]` from bytes: each group's first half in the low
    nibbles, its second half in the high ones."""
    b = packed.astype(np.uint8).reshape(groups, -1, *packed.shape[n_in:])
    return np.concatenate([b & 0xF, b >> 4], axis=1).astype(np.int16)


def numpy_dequantize(ints: np.ndarray, scale: np.ndarray, n_in: int) -> np.ndarray:
    """The oracle: int8 per output channel or per group (scale `[groups, out...]`); int4 affine
    over groups of consecutive rows of the last input axis, scale[:, 0] the step and scale[:, 1]
    the offset of each group."""
    if ints.dtype == np.int8 and scale.ndim == ints.ndim - n_in:
        return ints.astype(np.float32) * scale
    if ints.dtype == np.int8:
        groups = scale.shape[0]
        return (ints.reshape(groups, -1, *ints.shape[n_in:]) * scale[:, None]).reshape(ints.shape).astype(np.float32)
    values = unpack_groups(ints, n_in, scale.shape[0])
    shape = (*ints.shape[: n_in - 1], 2 * ints.shape[n_in - 1], *ints.shape[n_in:])
    return (values * scale[:, 0][:, None] + scale[:, 1][:, None]).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("shape, n_in", [((256, 4, 32), 1), ((4, 64, 96), 2), ((192, 48), 1)])
def test_int8_is_symmetric_per_output_channel(shape, n_in):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ints, scale = (np.asarray(a) for a in jax.jit(lambda x: quantize(x, n_in, Quantization("int8")))(w))
    k = math.prod(shape[:n_in])
    np.testing.assert_allclose(scale, np.abs(w.reshape(k, -1)).max(0).reshape(shape[n_in:]) / 127, rtol=1e-6)
    assert ints.dtype == np.int8 and ints.shape == shape and np.abs(ints.astype(int)).max() <= 127
    # Round to nearest: each integer is w / scale rounded.
    assert np.abs(ints - w / scale).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("shape, n_in, group", [((256, 4, 32), 1, 128), ((4, 64, 96), 2, 64), ((192, 48), 1, 64)])
def test_int4_is_affine_per_group_and_packed(shape, n_in, group):
    """group: 128 halved until it divides the last input axis (64 rows of a head; 192)."""
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ints, scale = (np.asarray(a) for a in jax.jit(lambda x: quantize(x, n_in, Quantization("int4")))(w))
    k = math.prod(shape[:n_in])
    wg = w.reshape(k // group, group, *shape[n_in:])
    np.testing.assert_allclose(scale[:, 0], (wg.max(1) - wg.min(1)) / 15, rtol=1e-5)
    np.testing.assert_allclose(scale[:, 1], wg.min(1), rtol=1e-6)
    # Two per byte: the last input axis is halved.
    assert ints.dtype == np.uint8 and ints.shape == (*shape[: n_in - 1], shape[n_in - 1] // 2, *shape[n_in:])
    values = unpack_groups(ints, n_in, k // group)
    assert values.min() >= 0 and values.max() <= 15
    exact = (wg - scale[:, 1][:, None]) / scale[:, 0][:, None]
    assert np.abs(values - exact).max() <= 0.5 + 1e-3
    # The group's extremes are representable: its min and max dequantize (almost) exactly.
    deq = numpy_dequantize(ints, scale, n_in).reshape(wg.shape)
    np.testing.assert_allclose(deq.min(1), wg.min(1), atol=1e-5)
    np.testing.assert_allclose(deq.max(1), wg.max(1), atol=1e-5)


@pytest.mark.parametrize("shape, n_in", [((256, 4, 32), 1), ((4, 64, 96), 2)])
def test_grouped_int8_is_symmetric_per_group(shape, n_in):
    """GGUF Q8_0's form: one scale per 32 consecutive rows of the last input axis and output."""
    w = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    ints, scale = (np.asarray(a) for a in jax.jit(lambda x: quantize(x, n_in, Quantization("int8", 32)))(w))
    groups = math.prod(shape[:n_in]) // 32
    wg = w.reshape(groups, 32, *shape[n_in:])
    assert ints.dtype == np.int8 and ints.shape == shape and scale.shape == (groups, *shape[n_in:])
    np.testing.assert_allclose(scale, np.abs(wg).max(1) / 127, rtol=1e-6)
    assert np.abs(ints.reshape(wg.shape) - wg / scale[:, None]).max() <= 0.5 + 1e-4


def all_logits(ex, ids):
    """The executor's float32 logits at every position of `ids`, one forward from empty."""
    handle = ex.new_kv_cache()
    try:
        (lg,) = ex.extend([(handle, ids)], "all")
    finally:
        ex.release_cache(handle.cache_id)
    return lg


def _dequantized_twin(ex: JaxModelExecutor) -> JaxModelExecutor:
    """A float executor whose weights are `ex`'s dequantized by the numpy oracle."""
    flat = {k: np.asarray(v) for k, v in flatten_state(ex._state).items()}
    floats = {}
    decls = declarations(ex.cfg)
    for path, value in flat.items():
        if path.endswith(SCALE):
            continue
        scale = flat.get(scale_path(path))
        if scale is None:
            floats[path] = value
        elif path.startswith("layers."):
            floats[path] = np.stack([numpy_dequantize(v, s, decls[path].n_in) for v, s in zip(value, scale)]).astype(np.float32)
        else:
            floats[path] = numpy_dequantize(value, scale, decls[path].n_in).astype(np.float32)
    graphdef, abstract = abstract_model(ex.cfg, np.float32)
    return JaxModelExecutor(ex.cfg, graphdef, unflatten_into(abstract, floats), model_id="twin", dtype="float32", **LIMITS_NO_DTYPE)


LIMITS_NO_DTYPE = {k: v for k, v in LIMITS.items() if k != "dtype"}


@pytest.mark.parametrize("method", ["int8", "int4", Quantization("int8", 32)], ids=["int8", "int4", "int8_g32"])
def test_quantized_step_equals_the_float_step_over_dequantized_weights(method):
    ex = fj.JaxModelExecutor.from_preset("tiny", quantization=method, **LIMITS)
    ids = list(range(3, 60))
    np.testing.assert_allclose(all_logits(ex, ids), all_logits(_dequantized_twin(ex), ids), atol=2e-5, rtol=1e-5)
    floats = fj.JaxModelExecutor.from_preset("tiny", **LIMITS)
    ratio = ex.memory_requirements().parameter_memory / floats.memory_requirements().parameter_memory
    assert ratio < (0.4 if method == "int4" else 0.5 if method == "int8" else 0.55)


@pytest.mark.parametrize("shape, lead, n_in, groups", [((3, 64, 4, 32), 1, 1, 1), ((2, 4, 16, 48), 1, 2, 4), ((96, 40), 0, 1, 3)])
def test_uint4_codes_are_the_packed_nibbles_unpacked(shape, lead, n_in, groups):
    """TPU's `uint4` form against the numpy oracle's unpacking, and packed back bit for bit."""
    packed = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    codes = jax.jit(lambda p: int4_codes.unpack(p, lead, n_in, groups))(packed)
    assert codes.dtype == jnp.uint4
    layers = packed[None] if lead == 0 else packed
    want = np.stack([unpack_groups(layer, n_in, groups) for layer in layers])
    np.testing.assert_array_equal(np.asarray(codes).astype(np.int16).reshape(want.shape), want)
    back = jax.jit(lambda c: int4_codes.pack(c, lead, n_in, groups))(codes)
    np.testing.assert_array_equal(np.asarray(back), packed)


@pytest.mark.parametrize("form", ["uint4", "int8_g32"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 24, 300])
@pytest.mark.parametrize("shape, n_in", [((256, 4, 32), 1), ((4, 64, 96), 2)])
def test_grouped_project_equals_the_dot_over_dequantized_weights(form, tokens, shape, n_in):
    """TPU's int4 form and grouped int8 through `project` (plain jit: XLA:CPU's ahead-of-time
    executables want uint4 arguments in a packed layout its arrays do not have): uint4 decode
    rows padded to 8, grouped partial dots up to groups x rows = inputs, the weight dequantized
    beyond, all against the numpy oracle's float weight."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=shape).astype(np.float32)
    quant = Quantization("int4") if form == "uint4" else Quantization("int8", 32)
    ints, scale = (np.asarray(a) for a in jax.jit(lambda x: quantize(x, n_in, quant))(w))
    codes = jax.jit(lambda p: int4_codes.unpack(p, 0, n_in, scale.shape[0]))(ints) if form == "uint4" else ints
    x = rng.normal(size=(tokens, math.prod(shape[:n_in]))).astype(np.float32)
    y = jax.jit(lambda x, c, s: project(x, nnx.Param(c), nnx.Param(s), n_in, jnp.float32))(x, codes, scale)
    want = x @ numpy_dequantize(ints, scale, n_in).reshape(x.shape[1], -1)
    np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, atol=2e-4, rtol=1e-5)


def test_an_executor_holding_uint4_codes_saves_the_packed_checkpoint(tmp_path):
    """The executor takes a state in TPU's form (what it converts to on TPU) at the packed
    form's size, and saving packs it back: the restored weights are the source's bit for bit."""
    src = fj.JaxModelExecutor.from_preset("tiny", quantization="int4", **LIMITS)
    want = {k: np.asarray(v) for k, v in flatten_state(src._state).items()}
    size = src.memory_requirements().parameter_memory
    ex = JaxModelExecutor(src.cfg, src._graphdef, int4_codes.state_to_uint4(src._state), model_id="uint4",
                          dtype="float32", quantization=src.quantization, hf_config=src.hf_config, **LIMITS_NO_DTYPE)  # fmt: skip
    assert flatten_state(ex._state)["layers.mlp.down.weight"].dtype == jnp.uint4
    assert ex.memory_requirements().parameter_memory == size
    ex.save_checkpoint(tmp_path / "q")
    back = flatten_state(fj.JaxModelExecutor.from_pretrained(tmp_path / "q", progress=False, **LIMITS)._state)
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(back[k]), want[k], err_msg=k)


@pytest.mark.parametrize("method", ["int4", Quantization("int8", 32)], ids=["int4", "int8_g32"])
def test_tensor_parallel_quantized_equals_one_device(method):
    one = fj.JaxModelExecutor.from_preset("tiny", quantization=method, **LIMITS)
    two = fj.JaxModelExecutor.from_preset("tiny", quantization=method, tensor_parallel_size=2, **LIMITS)
    ids = list(range(5, 40))
    np.testing.assert_allclose(all_logits(one, ids), all_logits(two, ids), atol=2e-4, rtol=1e-4)
    # Row-parallel down: its groups split with its inputs when each shard holds whole groups.
    scale = flatten_state(two._state)["layers.mlp.down.scale"]
    assert scale.sharding.spec[1] == ("model" if scale.shape[1] % 2 == 0 else None)
    # Column-parallel up: per-group scales split over the outputs, like the weight.
    assert flatten_state(two._state)["layers.mlp.up.scale"].sharding.spec[-1] == "model"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_orbax_round_trip_restores_quantized(tmp_path, method):
    src = fj.JaxModelExecutor.from_pretrained(fj.default_model_path(), quantization=method, progress=False, **LIMITS)
    src.save_checkpoint(tmp_path / "q")
    back = fj.JaxModelExecutor.from_pretrained(tmp_path / "q", progress=False, **LIMITS)
    assert back.quantization == src.quantization and back.quantization.method == method
    assert back.memory_requirements().parameter_memory == src.memory_requirements().parameter_memory
    ids = list(range(100, 140))
    np.testing.assert_array_equal(all_logits(back, ids), all_logits(src, ids))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (make test installs it)")
@pytest.mark.parametrize("method, stored_as", [("int8", "int8"), ("int4", "int4-g32")])
def test_convert_writes_a_quantized_checkpoint_that_aot_sizes_as_stored(tmp_path, method, stored_as):
    """int4 from the default model's Q4_1 file keeps its groups of 32 in the checkpoint, and the
    aot tool sizes them (their scales are 4x those of groups of 128)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / method
    run = subprocess.run([sys.executable, "-m", "ferrum_jax.convert", str(fj.default_model_path()), str(out), "--quantization", method],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and f"{method} weights" in run.stdout, run.stderr[-3000:]
    restored = fj.JaxModelExecutor.from_pretrained(out, progress=False, **LIMITS)
    stored = restored.memory_requirements().parameter_memory
    report = tmp_path / "r.json"
    run = subprocess.run(
        [sys.executable, "-m", "ferrum_jax.aot", "--target", "tpu-v5e-1", "--model", str(out), "--dtype", "float32",
         "--max-model-len", "256", "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--programs", "logits_last",
         "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    r = json.loads(report.read_text())
    assert r["limits"]["quantization"] == stored_as and r["weight_bytes_per_device"] == stored, (r, run.stderr[-2000:])


def test_a_q4_gguf_loads_its_own_blocks_as_int4():
    """The default model's Q4_1 tensors arrive as int4 in groups of 32 whose dequantized values
    are the gguf package's own dequantization of the file, bit for bit."""
    from ferrum_jax.executor.loading import hf_config_of
    from ferrum_jax.models.gguf_file import open_gguf
    from ferrum_jax.models.gguf_weights import GGUFCheckpoint

    ex = fj.JaxModelExecutor.from_pretrained(fj.default_model_path(), quantization="int4", progress=False, **LIMITS)
    assert ex.quantization == Quantization("int4", 32)
    flat = {k: np.asarray(v) for k, v in flatten_state(ex._state).items()}
    ckpt = GGUFCheckpoint(open_gguf(fj.default_model_path()), hf_config_of(fj.default_model_path()))
    for layer in (0, 17):
        down = numpy_dequantize(flat["layers.mlp.down.weight"][layer], flat["layers.mlp.down.scale"][layer], 1)
        np.testing.assert_array_equal(down, ckpt.read(f"model.layers.{layer}.mlp.down_proj.weight").T)
        q = numpy_dequantize(flat["layers.attn.wq.weight"][layer], flat["layers.attn.wq.scale"][layer], 1)
        np.testing.assert_array_equal(q.reshape(q.shape[0], -1), ckpt.read(f"model.layers.{layer}.self_attn.q_proj.weight").T)
        o = numpy_dequantize(flat["layers.attn.wo.weight"][layer], flat["layers.attn.wo.scale"][layer], 1)
        np.testing.assert_array_equal(o.reshape(-1, o.shape[-1]), ckpt.read(f"model.layers.{layer}.self_attn.o_proj.weight").T)


def perplexity(ex, ids: list[int], window: int = 512) -> float:
    """exp(mean NLL) over non-overlapping windows, each scored from its second token."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        lg = all_logits(ex, chunk).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float(np.sum(lse[:-1] - lg[np.arange(len(chunk) - 1), chunk[1:]]))
        count += len(chunk) - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def text_ids():
    from ferrum_jax.serve.tokenizer import load_tokenizer

    ids = load_tokenizer(fj.default_model_path()).encode(TEXT.read_text(), add_special_tokens=False)
    assert len(ids) > 2000
    return ids


def test_perplexity_of_the_default_model_float_int8_int4(text_ids):
    """Bounds, from measurements (BENCHMARKS.md): int8 +0.3%. int4 on the Q4_1 file the default
    model ships as keeps the file's 32-input blocks, its weights exactly; groups of 128 (64
    here: hidden 576) mix blocks and cost +45% (a 135M model is the worst case for 4 bits)."""
    limits = dict(dtype="float32", max_batch_size=1, max_sequence_length=512, max_num_batched_tokens=512, progress=False)
    # "int4" on this Q4_1 file keeps the file's blocks (groups of 32); "int4 g128" regroups.
    methods = {"float32": None, "int8": "int8", "int4": "int4", "int4 g128": Quantization("int4", 128)}
    ppl = {
        name: perplexity(fj.JaxModelExecutor.from_pretrained(fj.default_model_path(), quantization=q, **limits), text_ids)
        for name, q in methods.items()
    }
    print("perplexity", ppl)
    base = ppl["float32"]
    assert 5 < base < 40  # a 135M instruct model on plain English prose
    assert ppl["int8"] / base < 1.01
    assert ppl["int4"] / base < 1.01
    assert ppl["int4 g128"] / base < 1.5


# Sizes the TPU kernel tiles: 128-wide heads, 128-multiple widths per shard, 256-row K blocks.
KERNEL_CFG = ModelConfig(architecture="llama", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=128)  # fmt: skip


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (fake) devices")
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_grouped_int8_through_the_pallas_kernel_equals_xla(tp, monkeypatch):
    """Grouped int8 through the Mosaic kernel (interpreted, attention="pallas" on CPU) in the
    step, on one shard and under tensor parallelism (column layers on their columns, row layers
    on their slice of the inputs, summed; at TP 4 the KV heads replicate and o's 128 inputs per
    shard fit no kernel block, so o takes XLA): logits equal to XLA's grouped dots."""
    from ferrum_jax.models import grouped_kernels

    calls = []
    kernel = grouped_kernels.grouped_matmul_tpu
    monkeypatch.setattr(grouped_kernels, "grouped_matmul_tpu", lambda *a, **k: calls.append((a[1].shape, len(a))) or kernel(*a, **k))
    limits = dict(LIMITS, max_num_batched_tokens=32)
    quant = Quantization("int8", 32)
    xla = fj.JaxModelExecutor.from_config(KERNEL_CFG, seed=5, quantization=quant, attention="xla", **limits)
    pallas = fj.JaxModelExecutor.from_config(KERNEL_CFG, seed=5, quantization=quant, attention="pallas", tensor_parallel_size=tp, **limits)
    ids = list(range(7, 40))
    np.testing.assert_allclose(all_logits(pallas, ids), all_logits(xla, ids), atol=2e-4, rtol=1e-4)
    # Every decoder layer's codes are read in place, each shard's part of the whole `[layers, K,
    # N]` stack and the layer's index: q, k/v (whole when replicated), o, gate/up, down; only the
    # lm_head (no layer axis) is passed as `[K, N]`.
    kv = 256 if tp == 4 else 256 // tp
    in_place = {(2, 512, 512 // tp), (2, 512, kv), (2, 512, 1024 // tp), (2, 1024 // tp, 512)} | ({(2, 512 // tp, 512)} if tp < 4 else set())
    assert {shape for shape, n in calls if n == 3} == {(512, 512 // tp)}, calls
    assert {shape for shape, n in calls if n == 4} == in_place, calls
