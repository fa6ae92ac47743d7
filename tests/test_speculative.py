"""Speculative decoding: greedy streams identical to plain greedy decoding (n-gram, draft =
target, draft = another model), exact rejection sampling (chi-square against the target's
own distribution), and a KV prefix that matches the accepted stream after rejections."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
from ferrum_jax.engine.draft_model import DraftModelDrafter
from ferrum_jax.engine.drafter import NgramDrafter
from ferrum_jax.engine.rejection import accept_drafts
from ferrum_jax.models.config import ModelConfig

LIMITS = dict(dtype="float32", max_batch_size=8, max_sequence_length=128, page_size=8, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# Repetitive prompts (quoting earlier text) so n-gram lookup finds something to propose.
PROMPTS = [list(range(1, 20)) * 2, [5, 6, 7] * 5, list(range(30, 60)), [9]]


@pytest.fixture(scope="module")
def target():
    return fj.JaxModelExecutor.from_preset("tiny", **LIMITS)


async def collect(stream):
    toks = []
    async for out in stream:
        toks += out.new_token_ids
    return toks


def generate(ex, prompts, params, config=EngineConfig(), drafter=None):
    async def go():
        eng = Engine(ex, config, drafter)
        await eng.start()
        try:
            outs = await asyncio.gather(*[collect(eng.add_request(f"r{i}", p, params)) for i, p in enumerate(prompts)])
            return outs, eng.stats()
        finally:
            await eng.stop()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def plain(target):
    return generate(target, PROMPTS, GREEDY)[0]


def test_ngram_speculation_is_exactly_greedy(target, plain):
    got, stats = generate(target, PROMPTS, GREEDY, EngineConfig(num_speculative_tokens=4), NgramDrafter())
    assert got == plain
    assert stats.spec_verify_steps > 0 and stats.spec_draft_tokens > 0
    assert target.num_used_pages == 0


def test_draft_model_equal_to_target_accepts_everything(target, plain):
    draft = fj.JaxModelExecutor.from_preset("tiny", **LIMITS)
    got, stats = generate(target, PROMPTS, GREEDY, EngineConfig(num_speculative_tokens=3), DraftModelDrafter(draft, 320))
    assert got == plain
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens > 0
    assert draft.num_used_pages == 0


def test_different_draft_model_still_exactly_greedy(target, plain):
    draft = fj.JaxModelExecutor.from_preset("tiny", seed=7, **LIMITS)
    got, stats = generate(target, PROMPTS, GREEDY, EngineConfig(num_speculative_tokens=3), DraftModelDrafter(draft, 320))
    assert got == plain
    assert stats.spec_accepted_tokens < stats.spec_draft_tokens  # rejections happened
    assert target.num_used_pages == 0 and draft.num_used_pages == 0


def test_rejection_sampler_emits_the_target_distribution():
    rng = np.random.default_rng(0)
    vocab, n = 6, 40000
    p = rng.dirichlet(np.ones(vocab), size=2)
    q = rng.dirichlet(np.ones(vocab))
    counts = np.zeros(vocab)
    for _ in range(n):
        d = int(rng.choice(vocab, p=q))
        accepted, nxt = accept_drafts(p, [d], q[None], rng)
        counts[d if accepted else nxt] += 1
    expected = n * p[0]
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # 5 degrees of freedom, P(chi2 > 20.5) = 0.001


def test_speculative_sampling_matches_target_marginal():
    """Tiny vocabulary, a draft that differs: the 2nd generated token's frequency over many
    seeds equals the exact target marginal sum_t1 p(t1) p(t2 | t1)."""
    v = 8
    cfg = ModelConfig(architecture="llama", vocab_size=v, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    lim = dict(dtype="float32", max_batch_size=32, max_sequence_length=16, page_size=4, max_num_batched_tokens=64)
    tgt = fj.JaxModelExecutor.from_config(cfg, seed=1, **lim)
    drf = fj.JaxModelExecutor.from_config(cfg, seed=2, **lim)
    prompt = [1, 2, 3]

    async def exact():
        out = await tgt.prefill(fj.PrefillInput(input_ids=np.array([prompt], np.int32)))
        p1 = softmax(out.last_token_logits()[0])
        tgt.release_cache(out.kv_cache.cache_id)
        marg = np.zeros(v)
        for t1 in range(v):
            o = await tgt.prefill(fj.PrefillInput(input_ids=np.array([prompt + [t1]], np.int32)))
            marg += p1[t1] * softmax(o.last_token_logits()[0])
            tgt.release_cache(o.kv_cache.cache_id)
        return marg

    marginal = asyncio.run(exact())
    n = 800

    async def sample_many():
        eng = Engine(tgt, EngineConfig(num_speculative_tokens=2, max_waiting=n), DraftModelDrafter(drf, v))
        await eng.start()
        try:
            streams = [eng.add_request(f"s{i}", prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=3, ignore_eos=True)) for i in range(n)]
            outs = await asyncio.gather(*[collect(s) for s in streams])
            return outs, eng.stats()
        finally:
            await eng.stop()

    outs, stats = asyncio.run(sample_many())
    assert stats.spec_verify_steps > 0 and 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    counts = np.bincount([o[1] for o in outs], minlength=v)
    expected = n * marginal
    keep = expected >= 5  # chi-square needs expected counts of at least ~5 per bin
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < 24.3, (counts, expected)  # <= 7 degrees of freedom, significance 0.001


def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def test_kv_after_rejection_equals_fresh_prefill_of_accepted_stream(target):
    async def go():
        p = list(range(40, 52))
        out = await target.prefill(fj.PrefillInput(input_ids=np.array([p], np.int32)))
        first = int(np.argmax(out.last_token_logits()[0]))
        wrong = (first + 1) % 320
        sp = await target.speculative_decode(fj.DecodeInput(input_ids=np.array([[first]], np.int32), kv_cache=out.kv_cache), [wrong, 3, 4], 1.0)
        nxt = int(np.argmax(sp.next_logits[0]))
        assert sp.acceptance_count == 0 and sp.kv_cache.num_tokens == len(p) + 1
        d = await target.decode(fj.DecodeInput(input_ids=np.array([[nxt]], np.int32), kv_cache=sp.kv_cache))
        fresh = await target.prefill(fj.PrefillInput(input_ids=np.array([p + [first, nxt]], np.int32)))
        np.testing.assert_allclose(d.logits[0], fresh.logits[0, -1], rtol=1e-5, atol=1e-5)
        for h in (sp.kv_cache, fresh.kv_cache):
            target.release_cache(h.cache_id)

    asyncio.run(go())
