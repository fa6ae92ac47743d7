"""Automatic prefix caching: a sequence started from cached pages computes the same logits
as one that computed everything (the executor's own uncached path is the oracle), the
engine's outputs do not change with caching on, the page accounting holds under a random
workload with sharing, eviction, aborts and preemption, and a server reports the cached
tokens of a repeated 1000-token system prompt while computing only the new ones."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import openai
import pytest

import ferrum_jax as fj
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
from ferrum_jax.engine.drafter import NgramDrafter

PAGE = 8
LIMITS = dict(dtype="float32", max_batch_size=8, max_sequence_length=128, page_size=PAGE, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def ex():
    return fj.JaxModelExecutor.from_preset("tiny", **LIMITS)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def sharded(request, ex):
    """The executor at tensor parallelism 1 and 2 (fake CPU devices): pages and copies sharded by KV head."""
    return ex if request.param == 1 else fj.JaxModelExecutor.from_preset("tiny", **LIMITS, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def ex_off():
    return fj.JaxModelExecutor.from_preset("tiny", **LIMITS, enable_prefix_caching=False)


def tokens(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def fresh_logits(ex, ids):
    """Every row of `ids` computed from scratch in a sequence of its own."""
    h = ex.new_kv_cache()
    try:
        (out,) = ex.extend([(h, ids)], "all")
        return out
    finally:
        ex.release_cache(h.cache_id)


def check_accounting(ex):
    """Every page is empty, cached-and-free, or held, and held exactly as often as the live
    page tables list it."""
    alloc = ex._seqs.allocator
    assert alloc.num_empty + alloc.num_evictable + alloc.num_used == alloc.total
    held = {}
    for seq in ex._seqs._seqs.values():
        for p in (p for table in seq.tables for p in table if p):
            held[p] = held.get(p, 0) + 1
    assert held == {p: alloc.refcount(p) for p in held} and len(held) == alloc.num_used


def test_cached_prefix_gives_the_logits_of_a_full_computation(sharded):
    ex = sharded
    prompt, question = tokens(41, 0), tokens(11, 1)
    a = ex.new_kv_cache()
    ex.extend([(a, prompt)], "last")  # 5 full pages named
    match = ex.match_prefix(prompt + question)
    assert match.num_tokens == 40 and match.pages == (a.page_tables[0][:5],) and match.num_evictable == 0
    # The last token is always left to compute, so a prompt ending on a page boundary keeps its last page.
    assert ex.match_prefix(prompt[:40]).num_tokens == 32
    assert ex.match_prefix(prompt + question, cache_salt="other tenant").num_tokens == 0
    b = ex.new_kv_cache(prefix=match)
    assert b.num_tokens == 40 and b.page_tables[0] == a.page_tables[0][:5]
    (got,) = ex.extend([(b, prompt[40:] + question)], "all")
    np.testing.assert_allclose(got, fresh_logits(ex, prompt + question)[40:], rtol=1e-5, atol=1e-5)
    check_accounting(ex)
    ex.release_cache(a.cache_id)
    ex.release_cache(b.cache_id)
    check_accounting(ex)
    assert ex.num_used_pages == 0 and ex.num_cached_pages >= 5


def test_truncating_into_a_shared_page_copies_it(sharded):
    ex = sharded
    prompt = tokens(33, 2)
    a = ex.new_kv_cache()
    ex.extend([(a, prompt)], "last")
    b = ex.new_kv_cache(prefix=ex.match_prefix(prompt))
    ((b_pages,), (a_pages,)) = (b.page_tables, a.page_tables)
    assert b_pages == a_pages[:4]
    ex.truncate(b, 20)  # inside page 2, which a holds too
    ((b_pages,),) = (b.page_tables,)
    assert b_pages[:2] == a_pages[:2] and b_pages[2] != a_pages[2]
    other = tokens(9, 3)
    (got_b,) = ex.extend([(b, other)], "all")
    np.testing.assert_allclose(got_b, fresh_logits(ex, prompt[:20] + other)[20:], rtol=1e-5, atol=1e-5)
    (got_a,) = ex.extend([(a, [7])], "all")  # a's pages were not touched
    np.testing.assert_allclose(got_a, fresh_logits(ex, prompt + [7])[-1:], rtol=1e-5, atol=1e-5)
    check_accounting(ex)
    ex.release_cache(a.cache_id)
    ex.release_cache(b.cache_id)


def test_cached_pages_are_evicted_least_recently_freed_first():
    small = fj.JaxModelExecutor.from_preset("tiny", **{**LIMITS, "num_pages": 1 + 12})
    old, new = tokens(33, 4), tokens(33, 5)
    for ids in (old, new):
        h = small.new_kv_cache()
        small.extend([(h, ids)], "last")
        small.release_cache(h.cache_id)
    assert small.num_free_pages == 12 and small._seqs.allocator.num_evictable == 8
    filler = small.new_kv_cache()
    small.extend([(filler, tokens(8 * 8, 6))], "last")  # 4 empty pages, then 4 cached ones evicted
    assert small.match_prefix(old).num_tokens == 0 and small.match_prefix(new).num_tokens == 32
    check_accounting(small)
    small.release_cache(filler.cache_id)
    off = fj.JaxModelExecutor.from_preset("tiny", **LIMITS, enable_prefix_caching=False)
    h = off.new_kv_cache()
    off.extend([(h, old)], "last")
    assert off.match_prefix(old).num_tokens == 0 and off.num_cached_pages == 0


def run_engine(ex, requests, drafter=None, **config):
    """requests: (delay in engine polls, prompt, params); returns per request (tokens, last output)."""

    async def go():
        eng = Engine(ex, EngineConfig(**config), drafter)
        await eng.start()

        async def one(i, delay, prompt, params):
            await asyncio.sleep(delay)
            toks, last = [], None
            async for out in eng.add_request(f"r{i}", prompt, params):
                toks += out.new_token_ids
                last = out
            return toks, last

        try:
            return await asyncio.gather(*[one(i, *r) for i, r in enumerate(requests)])
        finally:
            await eng.stop()

    return asyncio.run(go())


def shared_prefix_requests(params_of):
    system = tokens(37, 7)
    cuts = [8, 13, 16, 24, 37, 37, 30]  # page-aligned and not, whole system prompt twice
    reqs = []
    for i, cut in enumerate(cuts):
        reqs.append((0.0, system[:cut] + tokens(5 + i, 100 + i), params_of(i)))  # concurrently
    for i, cut in enumerate(cuts):
        reqs.append((1.0 + 0.3 * i, system[:cut] + tokens(3 + i, 200 + i), params_of(i)))  # one after another
    return reqs


@pytest.mark.parametrize(
    "params_of",
    [
        lambda i: SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
        lambda i: SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True, logprobs=2),
    ],
    ids=["greedy", "seeded"],
)
def test_outputs_do_not_change_with_prefix_caching(ex, ex_off, params_of):
    reqs = shared_prefix_requests(params_of)
    queried, hits = ex.prefix_cache_tokens
    on = run_engine(ex, reqs)
    assert ex.prefix_cache_tokens[1] - hits >= 8 * len(reqs) // 2  # the later requests did hit
    off = run_engine(ex_off, reqs)
    assert ex_off.prefix_cache_tokens == (0, 0)
    for (toks_on, last_on), (toks_off, last_off) in zip(on, off):
        assert toks_on == toks_off and last_on.finish_reason == last_off.finish_reason == "length"
    assert sum(last.num_cached_tokens for _, last in on) > 0
    assert all(last.num_cached_tokens == 0 for _, last in off)
    assert ex.num_used_pages == ex_off.num_used_pages == 0


def test_speculative_decoding_with_cached_prefixes(ex, ex_off):
    reqs = shared_prefix_requests(lambda i: SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    on = run_engine(ex, reqs, NgramDrafter(), num_speculative_tokens=3)
    off = run_engine(ex_off, reqs, NgramDrafter(), num_speculative_tokens=3)
    assert [t for t, _ in on] == [t for t, _ in off]
    check_accounting(ex)
    assert ex.num_used_pages == 0


def test_page_accounting_under_a_random_workload():
    """Sharing, LRU eviction, aborts and preemption (a pool of 24 pages for 8 sequences of up
    to 96 tokens), checked before every step; in the end everything is free."""
    small = fj.JaxModelExecutor.from_preset("tiny", **{**LIMITS, "num_pages": 1 + 24})
    steps = []
    launch = small.launch_unified

    def checked_launch(*args, **kwargs):
        check_accounting(small)
        steps.append(small._seqs.allocator.num_evictable)
        return launch(*args, **kwargs)

    small.launch_unified = checked_launch
    rng = random.Random(0)
    systems = [tokens(n, 300 + n) for n in (20, 33, 48)]

    async def go():
        eng = Engine(small, EngineConfig())
        await eng.start()

        async def one(i):
            await asyncio.sleep(rng.random() * 2)
            prompt = rng.choice(systems)[: rng.randint(5, 48)] + tokens(rng.randint(1, 20), 400 + i)
            stream = eng.add_request(f"w{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0))
            abort_after = rng.randint(1, 10) if i % 4 == 0 else None
            seen = 0
            async for out in stream:
                seen += len(out.new_token_ids)
                if abort_after is not None and seen >= abort_after:
                    eng.abort(f"w{i}")

        try:
            await asyncio.gather(*[one(i) for i in range(40)])
            return eng.stats()
        finally:
            await eng.stop()

    stats = asyncio.run(go())
    check_accounting(small)
    alloc = small._seqs.allocator
    assert alloc.num_used == 0 and alloc.num_empty + alloc.num_evictable == alloc.total
    assert small.num_cached_pages == alloc.num_evictable  # every named page is a free cached one
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and max(steps) > 0
    assert len(small._seqs) == 0


def test_server_reports_cached_tokens_of_a_repeated_system_prompt():
    from ferrum_jax.serve.__main__ import build_context
    from ferrum_jax.serve.app import build_app
    from ferrum_jax.serve.byte_tokenizer import ByteTokenizer
    from ferrum_jax.serve.settings import parse_settings

    limits = dict(max_batch_size=4, max_num_batched_tokens=256, max_sequence_length=1280)
    settings = parse_settings(["--preset", "tiny", "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--max-model-len", "1280"])
    executor = fj.JaxModelExecutor.from_preset("tiny", **limits)
    computed = []
    launch = executor.launch_unified

    def counting_launch(items, rows, feed=None):
        computed.append(sum(len(item.q_tokens) for item in items))
        return launch(items, rows, feed)

    executor.launch_unified = counting_launch
    app = build_app(build_context(settings, executor, ByteTokenizer()))
    system = "".join(random.Random(1).choice("abcdefghij klmnop") for _ in range(1000))

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
                usages = []
                for question in ("What is it?", "And why?"):
                    before = sum(computed)
                    r = await client.completions.create(model="tiny", prompt=system + question, max_tokens=4, temperature=0)
                    usages.append((r.usage, sum(computed) - before))
                metrics = (await http.get("/metrics")).text
                return usages, metrics

    [(first, work1), (second, work2)], metrics = asyncio.run(run())
    assert first.prompt_tokens_details.cached_tokens == 0 and work1 == first.prompt_tokens + 3
    cached = second.prompt_tokens_details.cached_tokens
    # Byte tokenizer: one token per character, a BOS first; the cache holds whole 16-token pages.
    assert cached == (1 + 1000) // 16 * 16
    assert work2 == second.prompt_tokens - cached + 3  # only the new tokens, then 3 decodes
    assert f"ferrum:prefix_cache_hits_total{{model_name=\"tiny\"}} {float(cached)}" in metrics
    assert "ferrum:prefix_cache_queries_total" in metrics and "ferrum:prefix_cache_pages" in metrics
