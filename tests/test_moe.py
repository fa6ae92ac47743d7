"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against HuggingFace transformers, and the
dropless expert computation against a per-token numpy loop.

Tiny random models built by transformers from configs and saved with `save_pretrained` (HF's
per-expert tensor names). Router weights are scaled up so each token's top-k experts are clear
winners: near-ties would let float rounding pick different experts on the two sides.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import ferrum_jax as fj
from executor_runs import prefill_then_decode
import jax
import jax.numpy as jnp
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
from ferrum_jax.engine.drafter import NgramDrafter
import functools
import re

from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.executor import jax_executor
from ferrum_jax.models import moe as moe_module
from ferrum_jax.models.moe import _blocked, _expert_parallel, _gathered, _grouped, _in_place_cpu, _looped
from ferrum_jax.models.param_tree import flatten_state
from ferrum_jax.models.registry import declarations, model_config_from_dir
from ferrum_jax.models.sharding import make_mesh
from ferrum_jax.serve.loading import build_executor
from ferrum_jax.serve.settings import parse_settings

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(dtype="float32", page_size=8, max_batch_size=2, max_sequence_length=64, max_num_batched_tokens=64)
PROMPT_LEN = 30
REL_TOL = 1e-4
SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
CONFIGS = {
    # Every layer sparse, top-2 of 8 renormalized, q/k norms.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                                     num_experts_per_tok=2, norm_topk_prob=True),
    # Top-3 of 6 left as the softmax gives them.
    "qwen3_moe_unnormalized": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32,
                                                                  num_experts=6, num_experts_per_tok=3, norm_topk_prob=False),
    # Top-2 of 4, sliding window 8 shorter than the prompt, float32 routing weights.
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=8),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, tmp_path_factory):
    config = CONFIGS[request.param]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.mul_(100.0)
    path = tmp_path_factory.mktemp("moe") / request.param
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(ids.astype(np.int64))).logits[0].numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= REL_TOL, f"rel err {err:.2e}"


@pytest.mark.parametrize("tp,ep,kernel", [(1, False, True), (2, False, True), (2, True, True), (4, True, True),
                                          (1, False, False), (2, True, False)],
                         ids=["tp1", "tp2", "ep2", "ep4", "tp1-xla", "ep2-xla"])
def test_moe_logits_match_hf(moe, tp, ep, kernel, monkeypatch):
    """Prefill of 30 tokens (60-90 token-expert pairs), then 6 decode steps; at TP 2 every shard
    holds every expert's half of the MLP width (the down projection's partial sums added over the
    shards), with expert parallelism whole experts (8 / 6 / 4 over 2 shards, 8 and 4 over 4).
    The CPU kernel runs the experts, or (`-xla`) the XLA forms TPU/GPU share: blocked prefill,
    gathered decode."""
    path, model = moe
    if not kernel:  # as on a host without a C++ compiler (the program key names no kernel then)
        monkeypatch.setattr(moe_module, "cpu_kernel_target", lambda: None)
        monkeypatch.setattr(jax_executor, "expert_kernel_target", lambda: None)
    if ep and model_config_from_dir(path).num_experts % tp:
        pytest.skip("experts do not divide over the shards (test_expert_parallel_refuses_uneven_experts)")
    ids = np.random.default_rng(3).integers(3, 300, size=(1, PROMPT_LEN), dtype=np.int32)
    decode = np.random.default_rng(7).integers(3, 300, size=6).astype(np.int32)
    want = hf_logits(model, np.concatenate([ids[0], decode])[None])
    ex = fj.JaxModelExecutor.from_pretrained(path, tensor_parallel_size=tp, enable_expert_parallel=ep, **LIMITS)
    if ep:
        gate = flatten_state(ex._state)["layers.mlp.gate"]
        assert gate.sharding.shard_shape(gate.shape)[1] == gate.shape[1] // tp  # whole experts a shard
    pre, steps = prefill_then_decode(ex, ids, decode)
    assert_close(pre, want[:PROMPT_LEN])
    assert_close(steps, want[PROMPT_LEN:])


def test_orbax_checkpoint_restores_at_expert_parallel_and_with_pallas_attention(moe, tmp_path):
    """A MoE saved as a ferrum (orbax) checkpoint restores with its expert stacks, here split by
    expert over 2 devices, and with the Pallas attention kernel (interpret mode on CPU) the logits are
    HF's."""
    path, model = moe
    if model_config_from_dir(path).num_experts % 2:
        pytest.skip("experts do not divide over 2 shards")
    fj.JaxModelExecutor.from_pretrained(path, **LIMITS).save_checkpoint(tmp_path / "ckpt")
    ids = np.random.default_rng(5).integers(3, 300, size=(1, 12), dtype=np.int32)
    decode = np.random.default_rng(6).integers(3, 300, size=3).astype(np.int32)
    want = hf_logits(model, np.concatenate([ids[0], decode])[None])
    ex = fj.JaxModelExecutor.from_pretrained(str(tmp_path / "ckpt"), tensor_parallel_size=2, enable_expert_parallel=True,
                                             attention="pallas", **LIMITS)
    pre, steps = prefill_then_decode(ex, ids, decode)
    assert_close(pre, want[:12])
    assert_close(steps, want[12:])


def _reference(x, experts, weights, gate, up, down):
    """Per token, per chosen expert: the gated MLP, scaled and summed (float64)."""
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t]):
            h = x[t] @ gate[e]
            out[t] += w * ((h / (1 + np.exp(-h))) * (x[t] @ up[e])) @ down[e]
    return out


def _in_place(x, experts, weights, stacks, act):
    return _in_place_cpu(x, experts, weights, stacks, None)


def _problem(rng, t: int, d: int, f: int, e: int, scale: float = 4.0):
    """Tokens x `[t, d]` and stacks gate/up `[e, d, f]`, down `[e, f, d]` (numpy float32)."""
    x = rng.normal(size=(t, d)).astype(np.float32)
    gate, up = (rng.normal(size=(e, d, f)).astype(np.float32) / scale for _ in range(2))
    down = rng.normal(size=(e, f, d)).astype(np.float32) / (scale + 1)
    return x, (gate, up, down)


def _run(form, x, experts, weights, stacks) -> np.ndarray:
    return np.asarray(form(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights), tuple(map(jnp.asarray, stacks)), jax.nn.silu))


@pytest.mark.parametrize("run", [_grouped, _gathered, _looped, functools.partial(_blocked, block=8),
                                 functools.partial(_blocked, block=64), _in_place])
def test_every_token_on_one_expert_is_computed_in_full(run):
    """Dropless: all 40 tokens choose expert 2 first (no capacity: its group is 40 rows long),
    their second choices spread over the rest; every way of running the experts (the blocked
    form with 8-row blocks: expert 2 spans five; with 64: one block each; the CPU kernel's 40-row
    expert) against numpy."""
    rng = np.random.default_rng(0)
    t = 40
    x, stacks = _problem(rng, t, 16, 24, 5)
    experts = np.stack([np.full(t, 2), rng.choice([0, 1, 3, 4], size=t)], axis=1).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, 2)).astype(np.float32)
    np.testing.assert_allclose(_run(run, x, experts, weights, stacks), _reference(x, experts, weights, *stacks), rtol=1e-4, atol=1e-4)


def test_cpu_kernel_register_tiles_against_numpy():
    """Experts of 30-37 rows take the kernel's register tiles (4 rows x 32 columns, gate and up
    together): full tiles, a last tile of fewer rows and 16 columns left over, against numpy."""
    rng = np.random.default_rng(4)
    t, e = 51, 3
    x, stacks = _problem(rng, t, 64, 48, e, scale=8.0)
    experts = np.stack([rng.permutation(e)[:2] for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, 2)).astype(np.float32)
    assert np.bincount(experts.ravel()).min() >= 24  # every expert in the tiled form
    np.testing.assert_allclose(_run(_in_place, x, experts, weights, stacks), _reference(x, experts, weights, *stacks), rtol=1e-4, atol=1e-4)


_FORMS = {"grouped": _grouped, "gathered": _gathered, "looped": _looped, "blocked": functools.partial(_blocked, block=8),
          "in_place": _in_place}


@pytest.mark.parametrize("form", list(_FORMS))
def test_picks_outside_the_stacks_add_nothing(form):
    """An expert-parallel shard sees the other shards' picks shifted out of `[0, experts)`: every
    form leaves them out (numpy over the in-range picks only)."""
    rng = np.random.default_rng(1)
    t, e = 12, 4
    x, stacks = _problem(rng, t, 16, 24, e)
    experts = rng.integers(-4, 2 * e, size=(t, 3)).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, 3)).astype(np.float32)
    mine = (experts >= 0) & (experts < e)
    want = _reference(x, np.where(mine, experts, 0), np.where(mine, weights, 0), *stacks)
    np.testing.assert_allclose(_run(_FORMS[form], x, experts, weights, stacks), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("form", list(_FORMS))
def test_expert_parallel_equals_one_device(form, shards):
    """Each of 2 / 4 shards holds 4 / 2 of 8 whole experts and runs them for all 24 tokens; the
    psum of the shards equals numpy over all experts, in every form."""
    rng = np.random.default_rng(2)
    t, e = 24, 8
    x, (gate, up, down) = _problem(rng, t, 16, 24, e)
    experts = np.stack([rng.permutation(e)[:2] for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, 2)).astype(np.float32)
    mesh = make_mesh(shards)
    by_expert = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    stacks = tuple(jax.device_put(w, by_expert) for w in (gate, up, down))
    run = lambda *a: _FORMS[form](*a, jax.nn.silu)  # noqa: E731
    y = jax.jit(lambda *a: _expert_parallel(run, *a, mesh))(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights), stacks)
    np.testing.assert_allclose(np.asarray(y), _reference(x, experts, weights, gate, up, down), rtol=1e-4, atol=1e-4)


def test_expert_parallel_refuses_uneven_experts(tmp_path):
    """6 experts over 4 devices, asked for with the server's flag: refused, naming both numbers."""
    config = CONFIGS["qwen3_moe_unnormalized"]()
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    settings = parse_settings(["--model", str(tmp_path), "--tensor-parallel-size", "4", "--enable-expert-parallel"])
    with pytest.raises(fj.FerrumError, match=r"num_experts=6.*tensor_parallel_size=4"):
        build_executor(settings)


def test_cpu_kernel_reads_the_stacks_in_place():
    """A decode token through a loop over stacked layers: the compiled program hands the whole
    stacks to the kernel (the layer index beside them) and copies, slices or gathers no weight."""
    layers, e, d, f = 3, 8, 64, 32
    stacks = (jnp.ones((layers, e, d, f)), jnp.ones((layers, e, d, f)), jnp.ones((layers, e, f, d)))

    def forward(x, experts, weights, gate, up, down):
        def layer(i, x):
            return x + _in_place_cpu(x, experts, weights, tuple(LayerSlice(w, i) for w in (gate, up, down)), None)
        return jax.lax.fori_loop(0, layers, layer, x)

    args = (jnp.ones((1, d)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), *stacks)
    hlo = jax.jit(forward).lower(*args).compile().as_text()
    assert "custom-call" in hlo and "ferrum_moe_cpu" in hlo
    weight_ops = re.findall(rf"= f32\[[^\]]*{d},{f}\]\S* (copy|dynamic-slice|gather|slice)\(|= f32\[[^\]]*{f},{d}\]\S* (copy|dynamic-slice|gather|slice)\(", hlo)
    assert not weight_ops, weight_ops


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t = torch.tensor([ids])
        return model.generate(t, attention_mask=torch.ones_like(t), generation_config=gen)[0, len(ids):].tolist()


def test_engine_with_prefix_caching_and_speculation_generates_as_hf(moe):
    """Concurrent requests through the engine, prefix caching on (the last request repeats the
    first prompt: a hit) and n-gram speculation (prompts that repeat themselves, so drafts are
    proposed and verified in multi-token steps): every token as HF's greedy generate."""
    path, model = moe
    rng = np.random.default_rng(5)
    prompts = [(rng.integers(3, 300, n).tolist() * 3)[:m] for n, m in ((7, 21), (5, 15), (11, 33))]
    prompts.append(prompts[0])
    want = [greedy_hf(model, p, 12) for p in prompts]
    ex = fj.JaxModelExecutor.from_pretrained(path, **{**LIMITS, "max_batch_size": 4})
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def go():
        eng = Engine(ex, EngineConfig(num_speculative_tokens=3), NgramDrafter())
        await eng.start()
        try:
            async def one(i, p):
                toks = []
                async for out in eng.add_request(f"r{i}", p, params):
                    toks += out.new_token_ids
                return toks

            first = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts[:3])])
            return first + [await one(3, prompts[3])], eng.stats()
        finally:
            await eng.stop()

    got, stats = asyncio.run(go())
    assert got == want
    assert ex.prefix_cache_tokens[1] >= 16 and ex.num_used_pages == 0
    assert stats.spec_draft_tokens > 0 and stats.spec_verify_steps > 0, stats


def test_qwen3_30b_a3b_parameters_by_hand():
    """configs/models/qwen3-30b-a3b: 48 layers of 128 experts (2048 -> 768 -> 2048), 32 query
    and 4 KV heads of 128, vocabulary 151936, untied: Qwen's 30.5B total, and per token the
    attention plus 8 of the 128 experts."""
    cfg = model_config_from_dir(REPO / "configs" / "models" / "qwen3-30b-a3b")
    experts = 48 * 128 * 3 * 2048 * 768
    attention = 48 * (2 * 2048 * 4096 + 2 * 2048 * 512)
    norms = 48 * (2 * 2048 + 2 * 128) + 2048
    router = 48 * 2048 * 128
    embeddings = 2 * 151936 * 2048
    decls = declarations(cfg)
    assert decls.num_parameters() == experts + attention + norms + router + embeddings == 30_532_122_624
    assert decls.layer_matmul_parameters() == attention + experts * 8 // 128
