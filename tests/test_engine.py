"""Continuous-batching engine: greedy output equals the executor's own prefill/decode
argmax (an independent path), seeds reproduce whatever shares the batch, preemption under
a tiny KV pool changes no output, aborts free pages, stop conditions end where a hand
count says they must."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams

LIMITS = dict(dtype="float32", max_batch_size=8, max_sequence_length=128, page_size=8, max_num_batched_tokens=64)
VOCAB = 320


@pytest.fixture(scope="module")
def ex():
    return fj.JaxModelExecutor.from_preset("tiny", **LIMITS)


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def greedy_reference(ex, tokens, n):
    async def go():
        out = await ex.prefill(fj.PrefillInput(input_ids=np.array([tokens], np.int32)))
        gen = [int(np.argmax(out.last_token_logits()[0]))]
        for _ in range(n - 1):
            d = await ex.decode(fj.DecodeInput(input_ids=np.array([[gen[-1]]], np.int32), kv_cache=out.kv_cache))
            gen.append(int(np.argmax(d.logits[0])))
        ex.release_cache(out.kv_cache.cache_id)
        return gen

    return asyncio.run(go())


async def collect(stream):
    toks, last = [], None
    async for out in stream:
        toks += out.new_token_ids
        last = out
    return toks, last


def with_engine(ex, body, **config):
    async def go():
        eng = Engine(ex, EngineConfig(**config))
        await eng.start()
        try:
            return await body(eng)
        finally:
            await eng.stop()

    return asyncio.run(go())


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_concurrent_greedy_equals_executor_greedy(ex):
    prompts = [prompt(n, i) for i, n in enumerate([5, 17, 40, 3, 64, 90])]
    want = [greedy_reference(ex, p, 12) for p in prompts]

    async def body(eng):
        streams = [eng.add_request(f"g{i}", p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts)]
        return await asyncio.gather(*[collect(s) for s in streams])

    got = with_engine(ex, body)
    for (toks, last), w, p in zip(got, want, prompts):
        assert toks == w
        assert last.finish_reason == "length" and last.num_output_tokens == 12 and last.num_prompt_tokens == len(p)
    assert ex.num_used_pages == 0


def test_seed_reproduces_whatever_shares_the_batch(ex):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    p = prompt(20, 99)

    async def alone(eng):
        return await collect(eng.add_request("alone", p, params))

    async def crowded(eng):
        others = [eng.add_request(f"o{i}", prompt(10 + 7 * i, i), SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)) for i in range(5)]
        mine = eng.add_request("mine", p, params)
        res = await asyncio.gather(collect(mine), *[collect(o) for o in others])
        return res[0]

    a, _ = with_engine(ex, alone)
    b, _ = with_engine(ex, crowded)
    assert a == b
    c, _ = with_engine(ex, lambda eng: collect(eng.add_request("other-seed", p, SamplingParams(**{**params.__dict__, "seed": 7}))))
    assert c != a


def test_preemption_under_a_tiny_pool_changes_no_output():
    small = fj.JaxModelExecutor.from_preset("tiny", **{**LIMITS, "num_pages": 13})  # 12 pages = 96 tokens
    prompts = [prompt(n, 50 + i) for i, n in enumerate([20, 30, 12, 25, 18, 9])]
    want = [greedy_reference(small, p, 24) for p in prompts]

    async def body(eng):
        streams = [eng.add_request(f"p{i}", p, SamplingParams(max_tokens=24, **GREEDY)) for i, p in enumerate(prompts)]
        res = await asyncio.gather(*[collect(s) for s in streams])
        return res, eng.stats()

    got, stats = with_engine(small, body)
    assert stats.num_preemptions > 0
    assert [t for t, _ in got] == want
    assert stats.kv_cache_usage == 0 and small.num_used_pages == 0


def test_abort_frees_pages_and_ends_the_stream(ex):
    async def body(eng):
        s = eng.add_request("ab", prompt(30, 3), SamplingParams(max_tokens=100, **GREEDY))
        keep = eng.add_request("keep", prompt(10, 4), SamplingParams(max_tokens=30, **GREEDY))
        first = await s.__anext__()
        assert len(first.new_token_ids) == 1
        await s.aclose()
        toks, last = await collect(keep)
        for _ in range(100):
            if ex.num_used_pages == 0:
                break
            await asyncio.sleep(0.01)
        return toks, last, eng.stats()

    toks, last, stats = with_engine(ex, body)
    assert len(toks) == 30 and last.finish_reason == "length"
    assert stats.num_running == 0 and ex.num_used_pages == 0


def test_stop_token_min_tokens_and_eos(ex):
    p = prompt(12, 21)
    ref = greedy_reference(ex, p, 30)
    stop = ref[5]
    first = ref.index(stop)

    async def body(eng):
        a = await collect(eng.add_request("s1", p, SamplingParams(max_tokens=30, stop_token_ids=[stop], **GREEDY)))
        # eos = the same token through the engine's eos set, but ignore_eos=False
        b = await collect(eng.add_request("s2", p, SamplingParams(temperature=0.0, max_tokens=30)))
        c = await collect(eng.add_request("s3", p, SamplingParams(temperature=0.0, max_tokens=30, min_tokens=first + 2)))
        return a, b, c

    (a, la), (b, lb), (c, lc) = with_engine(ex, body, eos_token_ids=(stop,))
    assert a == ref[: first + 1] and la.finish_reason == "stop" and la.stop_token_id == stop
    assert b == ref[: first + 1] and lb.finish_reason == "stop"
    # under min_tokens the stop token is masked: the output follows it no more, and never holds it early
    assert stop not in c[: first + 2] and len(c) >= first + 2


def test_logprobs_are_the_models_log_softmax(ex):
    p = prompt(9, 31)

    async def body(eng):
        return await collect(eng.add_request("lp", p, SamplingParams(max_tokens=1, logprobs=5, **GREEDY)))

    (toks, last) = with_engine(ex, body)
    ref = asyncio.run(ex.prefill(fj.PrefillInput(input_ids=np.array([p], np.int32))))
    ex.release_cache(ref.kv_cache.cache_id)
    logits = ref.last_token_logits()[0]
    lsm = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    (lp,) = last.new_logprobs
    assert lp.token_id == toks[0] == int(np.argmax(logits))
    np.testing.assert_allclose(lp.logprob, lsm[toks[0]], atol=1e-4)
    assert [t for t, _ in lp.top] == np.argsort(-lsm)[:5].tolist()


def test_refusals(ex):
    async def body(eng):
        with pytest.raises(fj.InvalidRequestError, match="leaving no room"):
            eng.add_request("long", [1] * 128, SamplingParams())
        with pytest.raises(fj.InvalidRequestError, match="outside the vocabulary"):
            eng.add_request("oov", [VOCAB], SamplingParams())
        with pytest.raises(fj.InvalidRequestError, match="empty"):
            eng.add_request("empty", [], SamplingParams())
        eng.add_request("q1", [1, 2], SamplingParams(max_tokens=2))
        eng.add_request("q2", [1, 2], SamplingParams(max_tokens=2))
        with pytest.raises(fj.ResourceExhaustedError, match="max_waiting=2"):
            eng.add_request("q3", [1, 2], SamplingParams(max_tokens=2))
        with pytest.raises(fj.InvalidRequestError, match="already in flight"):
            eng.add_request("q1", [1, 2], SamplingParams())
        await eng.drain(10.0)
        with pytest.raises(fj.FerrumError):
            eng.add_request("late", [1], SamplingParams())

    with_engine(ex, body, max_waiting=2)
    with pytest.raises(fj.InvalidRequestError) as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"


class RecordingExecutor:
    """The executor, with a log of launches (and how many tokens each fed on device) and reads."""

    def __init__(self, ex):
        self._ex, self.log = ex, []

    def __getattr__(self, name):
        return getattr(self._ex, name)

    def launch_unified(self, items, rows, feed=None):
        launched = self._ex.launch_unified(items, rows, feed)
        self.log.append(("launch", id(launched), len(feed[1]) if feed else 0))
        return launched

    def collect(self, launched):
        self.log.append(("read", id(launched), 0))
        return self._ex.collect(launched)


def test_async_scheduling_launches_the_next_step_before_reading_and_changes_no_output(ex):
    """Seeded sampling, penalties (whose history needs the pending token: a read first),
    min_tokens, stop tokens, logprobs and max_tokens ending at different steps: the same tokens
    with and without async scheduling; with it, decodes are fed on device and step N+1 is
    launched before step N is read."""
    prompts = [prompt(n, 70 + i) for i, n in enumerate([6, 19, 33, 4, 50])]
    params = [
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=6, max_tokens=14, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=5, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=3),
        SamplingParams(temperature=1.0, seed=8, max_tokens=17, stop_token_ids=list(range(1, VOCAB, 9)), ignore_eos=True),
    ]

    def run(async_scheduling):
        rec = RecordingExecutor(ex)

        async def body(eng):
            streams = [eng.add_request(f"a{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
            return await asyncio.gather(*[collect(s) for s in streams])

        async def go():
            eng = Engine(rec, EngineConfig(async_scheduling=async_scheduling, eos_token_ids=tuple(range(0, VOCAB, 25))))
            await eng.start()
            try:
                return await body(eng)
            finally:
                await eng.stop()

        got = asyncio.run(go())
        outs = [(toks, last.finish_reason, [lp for lp in (last.new_logprobs or ())]) for toks, last in got]
        return outs, rec.log

    sync, sync_log = run(False)
    asynchronous, async_log = run(True)
    assert [o[:2] for o in asynchronous] == [o[:2] for o in sync]
    assert sync[4][1] == "stop" and len(sync[4][0]) < 17  # found while the next step was in flight
    assert asynchronous[1][2][0].token_id == sync[1][2][0].token_id
    np.testing.assert_allclose(asynchronous[1][2][0].logprob, sync[1][2][0].logprob, atol=1e-5)
    assert all(a == ("read", b[1], 0) for a, b in zip(sync_log[1::2], sync_log[0::2]))
    assert sum(fed for kind, _, fed in async_log if kind == "launch") > 0
    # A step read after the next one was launched: the host prepared N+1 while N ran.
    last_launch, overlapped = None, 0
    for kind, step, _ in async_log:
        if kind == "launch":
            last_launch = step
        else:
            overlapped += step != last_launch
    assert overlapped >= 10
    assert ex.num_used_pages == 0
