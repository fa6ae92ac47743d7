"""JaxModelExecutor behaviour: every path of the one ragged step agrees with the plain path
(chunked vs whole prefill, unified vs alone, verify vs serial decode, truncate vs fresh
prefill), warmup leaves nothing to compile, page accounting is exact, bad input is a
FerrumError that leaves other sequences untouched."""

from __future__ import annotations

import asyncio

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.models.param_tree import flatten_state
from ferrum_jax.step.sampling import SamplingRow

VOCAB = 320  # configs/tiny.yaml
LIMITS = dict(max_batch_size=4, max_sequence_length=128, page_size=8, max_num_batched_tokens=64)


def run(coro):
    return asyncio.run(coro)


def ids(*tokens):
    return np.array([list(tokens)], np.int32)


@pytest.fixture(scope="module")
def ex():
    return fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **LIMITS)


@pytest.fixture
def clean(ex):
    yield ex
    for seq_id in [s for s in list(ex._seqs._seqs)]:
        ex.release_cache(seq_id)
    assert ex.num_used_pages == 0


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int32)


def greedy(ex, tokens, steps):
    """Greedy continuation through prefill + decode; returns the generated ids."""
    out = run(ex.prefill(fj.PrefillInput(input_ids=tokens[None])))
    nxt = int(np.argmax(out.last_token_logits()[0]))
    gen, h = [nxt], out.kv_cache
    for _ in range(steps - 1):
        d = run(ex.decode(fj.DecodeInput(input_ids=ids(nxt), kv_cache=h)))
        nxt = int(np.argmax(d.logits[0]))
        gen.append(nxt)
    ex.release_cache(h.cache_id)
    return gen


def test_shapes_of_public_outputs(clean):
    ex = clean
    out = run(ex.prefill(fj.PrefillInput(input_ids=ids(1, 2, 3))))
    chex.assert_shape(out.logits, (1, 3, VOCAB))
    chex.assert_shape(out.last_token_logits(), (1, VOCAB))
    assert out.kv_cache.num_tokens == 3
    d = run(ex.decode(fj.DecodeInput(input_ids=ids(7), kv_cache=out.kv_cache)))
    chex.assert_shape(d.logits, (1, VOCAB))
    assert d.kv_cache.num_tokens == 4
    bo = run(ex.batch_prefill([fj.PrefillInput(input_ids=ids(1, 2)), fj.PrefillInput(input_ids=ids(3, 4, 5))]))
    chex.assert_shape([bo[0].logits, bo[1].logits], [(1, 2, VOCAB), (1, 3, VOCAB)])
    bd = run(ex.batch_decode([fj.DecodeInput(input_ids=ids(1), kv_cache=o.kv_cache) for o in bo]))
    chex.assert_shape([o.logits for o in bd], [(1, VOCAB)] * 2)
    assert all(np.isfinite(o.logits).all() for o in bd)


def test_decode_equals_prefill_of_the_longer_prompt(clean):
    ex = clean
    toks = prompt(20, seed=1)
    out = run(ex.prefill(fj.PrefillInput(input_ids=toks[None, :19])))
    d = run(ex.decode(fj.DecodeInput(input_ids=toks[None, 19:], kv_cache=out.kv_cache)))
    full = run(ex.prefill(fj.PrefillInput(input_ids=toks[None])))
    np.testing.assert_allclose(d.logits[0], full.logits[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits[0], full.logits[0, :19], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_token_budget_is_chunked_transparently(clean):
    ex = clean
    toks = prompt(100, seed=2)  # > max_num_batched_tokens=64: two steps
    big = fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **{**LIMITS, "max_num_batched_tokens": 128})
    a = run(ex.prefill(fj.PrefillInput(input_ids=toks[None])))
    b = run(big.prefill(fj.PrefillInput(input_ids=toks[None])))
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_through_unified_decode_matches_one_prefill(clean):
    ex = clean
    toks = prompt(45, seed=3)
    h = ex.new_kv_cache()
    cuts = [0, 13, 16, 31, 45]
    results = []
    for a, b in zip(cuts, cuts[1:]):
        item = fj.UnifiedBatchItem(seq_id="s", q_tokens=toks[a:b].tolist(), kv_cache=h, pos_offset=a, is_final_chunk=b == 45)
        results.append(run(ex.unified_decode(fj.UnifiedBatch(items=[item])))[0])
    assert results[:-1] == [None, None, None]
    whole = run(ex.prefill(fj.PrefillInput(input_ids=toks[None])))
    chex.assert_shape(results[-1], (VOCAB,))
    np.testing.assert_allclose(results[-1], whole.logits[0, -1], rtol=1e-5, atol=1e-5)


def test_mixed_unified_batch_matches_items_run_alone(clean):
    ex = clean
    p1, p2, p3 = prompt(9, 4), prompt(30, 5), prompt(12, 6)
    # alone
    o1 = run(ex.prefill(fj.PrefillInput(input_ids=p1[None])))
    alone_decode = run(ex.decode(fj.DecodeInput(input_ids=ids(5), kv_cache=o1.kv_cache))).logits[0]
    o3 = run(ex.prefill(fj.PrefillInput(input_ids=p3[None, :4])))
    alone_mid = run(ex.prefill(fj.PrefillInput(input_ids=p3[None, 4:], kv_cache=o3.kv_cache))).logits[0, -1]
    alone_new = run(ex.prefill(fj.PrefillInput(input_ids=p2[None]))).logits[0, -1]
    # together: a decode, a fresh prefill, a continuing chunk, and an intermediate chunk
    m1 = run(ex.prefill(fj.PrefillInput(input_ids=p1[None])))
    m3 = run(ex.prefill(fj.PrefillInput(input_ids=p3[None, :4])))
    fresh, partial = ex.new_kv_cache(), ex.new_kv_cache()
    items = [
        fj.UnifiedBatchItem("dec", [5], m1.kv_cache, 9, True),
        fj.UnifiedBatchItem("new", p2.tolist(), fresh, 0, True),
        fj.UnifiedBatchItem("mid", p3[4:].tolist(), m3.kv_cache, 4, True),
        fj.UnifiedBatchItem("part", p2[:7].tolist(), partial, 0, False),
    ]
    batch = fj.UnifiedBatch(items=items)
    assert batch.total_q_tokens() == 1 + 30 + 8 + 7 and batch.num_sampled_items() == 3
    got = run(ex.unified_decode(batch))
    np.testing.assert_allclose(got[0], alone_decode, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], alone_new, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], alone_mid, rtol=1e-5, atol=1e-5)
    assert got[3] is None and partial.num_tokens == 7


def test_forward_verify_matches_serial_decodes(clean):
    ex = clean
    p = prompt(17, 7)
    follow = [11, 22, 33, 44, 55]
    a = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    serial = [run(ex.decode(fj.DecodeInput(input_ids=ids(t), kv_cache=a.kv_cache))).logits for t in follow]
    b = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    verified = run(ex.forward_verify([fj.DecodeInput(input_ids=ids(t), kv_cache=b.kv_cache) for t in follow]))
    assert len(verified) == len(follow) and b.kv_cache.num_tokens == 17 + len(follow)
    for s, v in zip(serial, verified):
        chex.assert_shape(v.logits, (1, VOCAB))
        np.testing.assert_allclose(v.logits, s, rtol=1e-5, atol=1e-5)


def test_truncate_then_decode_equals_fresh_prefill_of_prefix(clean):
    ex = clean
    p = prompt(40, 8)
    out = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    pages_before = ex.num_used_pages
    run(ex.truncate_kv(out.kv_cache, 21))
    assert out.kv_cache.num_tokens == 21
    assert ex.num_used_pages == pages_before - (5 - 3)  # 40 tokens: 5 pages of 8; 21 tokens: 3
    d = run(ex.decode(fj.DecodeInput(input_ids=ids(99), kv_cache=out.kv_cache)))
    fresh = run(ex.prefill(fj.PrefillInput(input_ids=np.concatenate([p[:21], [99]])[None].astype(np.int32))))
    np.testing.assert_allclose(d.logits[0], fresh.logits[0, -1], rtol=1e-5, atol=1e-5)


def test_speculative_decode_threshold_one_is_greedy(clean):
    ex = clean
    p = prompt(10, 9)
    want = greedy(ex, p, 6)
    out = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    first = want[0]
    drafts = want[1:4] + [(want[4] + 1) % VOCAB]  # three right, then a wrong one
    sp = run(ex.speculative_decode(fj.DecodeInput(input_ids=ids(first), kv_cache=out.kv_cache), drafts, 1.0))
    assert sp.accepted_tokens == want[1:4] and sp.acceptance_count == 3
    assert sp.kv_cache.num_tokens == 10 + 1 + 3
    assert int(np.argmax(sp.next_logits[0])) == want[4]
    d = run(ex.decode(fj.DecodeInput(input_ids=ids(want[4]), kv_cache=sp.kv_cache)))
    assert int(np.argmax(d.logits[0])) == want[5]


def test_speculative_threshold_accepts_non_argmax_exactly_when_prob_clears(clean):
    ex = clean
    p = prompt(10, 10)
    out = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    d = run(ex.decode(fj.DecodeInput(input_ids=ids(3), kv_cache=out.kv_cache)))
    probs = np.exp(d.logits[0] - d.logits[0].max())
    probs /= probs.sum()
    second = int(np.argsort(probs)[-2])
    run(ex.truncate_kv(out.kv_cache, 10))
    for threshold, accepted in [(float(probs[second]) * 0.99, 1), (float(probs[second]) * 1.01, 0)]:
        sp = run(ex.speculative_decode(fj.DecodeInput(input_ids=ids(3), kv_cache=out.kv_cache), [second], threshold))
        assert sp.acceptance_count == accepted
        run(ex.truncate_kv(out.kv_cache, 10))


def test_page_accounting_random_workload(clean):
    ex = clean
    rng = np.random.default_rng(11)
    live = []
    for _ in range(60):
        op = rng.integers(0, 4)
        try:
            if op == 0 or not live:
                n = int(rng.integers(1, 60))
                live.append(run(ex.prefill(fj.PrefillInput(input_ids=prompt(n, int(rng.integers(1e6)))[None]))).kv_cache)
            elif op == 1:
                h = live[rng.integers(len(live))]
                run(ex.decode(fj.DecodeInput(input_ids=ids(1), kv_cache=h)))
            elif op == 2:
                h = live[rng.integers(len(live))]
                run(ex.truncate_kv(h, int(rng.integers(0, h.num_tokens + 1))))
            else:
                ex.release_cache(live.pop(rng.integers(len(live))).cache_id)
        except fj.FerrumError:
            pass
        assert ex.num_free_pages + ex.num_used_pages == ex.num_total_pages
        assert ex.num_used_pages == sum(-(-h.num_tokens // 8) for h in live)
    for h in live:
        ex.release_cache(h.cache_id)
    assert ex.num_used_pages == 0 and ex.num_free_pages == ex.num_total_pages


def test_bad_input_is_a_clear_error_and_leaves_others_intact(clean):
    ex = clean
    p = prompt(12, 12)
    keep = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    expected_next = run(ex.prefill(fj.PrefillInput(input_ids=np.append(p, 4)[None].astype(np.int32)))).logits[0, -1]
    used = ex.num_used_pages
    live = ex.num_live_sequences

    with pytest.raises(fj.InvalidRequestError, match="outside the vocabulary"):
        run(ex.prefill(fj.PrefillInput(input_ids=ids(1, VOCAB))))
    with pytest.raises(fj.InvalidRequestError, match="outside the vocabulary"):
        run(ex.decode(fj.DecodeInput(input_ids=ids(-1), kv_cache=keep.kv_cache)))
    with pytest.raises(fj.InvalidRequestError, match="max_sequence_length=128"):
        run(ex.prefill(fj.PrefillInput(input_ids=prompt(129)[None])))
    with pytest.raises(fj.InvalidRequestError, match=r"shape \[1, n\]"):
        run(ex.prefill(fj.PrefillInput(input_ids=np.ones((2, 3), np.int32))))
    with pytest.raises(fj.InvalidRequestError, match="truncate_kv to 13"):
        run(ex.truncate_kv(keep.kv_cache, 13))
    gone = run(ex.prefill(fj.PrefillInput(input_ids=ids(1, 2))))
    ex.release_cache(gone.kv_cache.cache_id)
    with pytest.raises(fj.InvalidRequestError, match="unknown or released"):
        run(ex.decode(fj.DecodeInput(input_ids=ids(1), kv_cache=gone.kv_cache)))
    with pytest.raises(fj.InvalidRequestError, match="pos_offset=3"):
        run(ex.unified_decode(fj.UnifiedBatch(items=[fj.UnifiedBatchItem("x", [1], keep.kv_cache, 3, True)])))
    with pytest.raises(fj.InvalidRequestError, match="twice"):
        run(ex.batch_decode([fj.DecodeInput(input_ids=ids(1), kv_cache=keep.kv_cache)] * 2))
    assert ex.num_used_pages == used and ex.num_live_sequences == live

    d = run(ex.decode(fj.DecodeInput(input_ids=ids(4), kv_cache=keep.kv_cache)))
    np.testing.assert_allclose(d.logits[0], expected_next, rtol=1e-5, atol=1e-5)


def test_pages_exhausted_is_resource_exhausted_without_leaks():
    small = fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **{**LIMITS, "num_pages": 6})  # 5 usable
    a = run(small.prefill(fj.PrefillInput(input_ids=prompt(24)[None])))  # 3 pages
    before = (small.num_used_pages, small.num_live_sequences)
    with pytest.raises(fj.ResourceExhaustedError, match="3 pages needed, 2 of 5 free"):
        run(small.prefill(fj.PrefillInput(input_ids=prompt(17)[None])))
    with pytest.raises(fj.ResourceExhaustedError):
        run(small.batch_prefill([fj.PrefillInput(input_ids=prompt(8)[None]), fj.PrefillInput(input_ids=prompt(9)[None])]))
    assert (small.num_used_pages, small.num_live_sequences) == before
    d = run(small.decode(fj.DecodeInput(input_ids=ids(1), kv_cache=a.kv_cache)))
    assert np.isfinite(d.logits).all()


def programs(w):
    kinds = [kind for kind, _ in w._programs]
    return kinds.count("step"), kinds.count("sampler"), kinds.count("distribution")


def test_warmup_compiles_every_bucket_once_and_then_nothing(no_persistent_cache):
    compiles = []

    def listener(name, _duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    w = fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **{**LIMITS, "max_batch_size": 2, "max_num_batched_tokens": 32})
    assert w._kv is not None  # the pool's zeros, allocated in the background, are not a step program
    n_before = len(compiles)
    run(w.warmup())
    # T buckets 16,32 x {per-seq rows, all rows} at S = 2 only (a logit row of the tiny model is
    # 128 x 320 / 393216 = 0.104 tokens of layer FLOPs: S=1 would save 0.6% of a 16-token
    # step, batch.step_cost), plus the decode buckets T = S = 1, 2; the sampler and
    # distributions: one per row bucket (1, 2) and T bucket
    assert w.num_step_programs() == (2 * 2 + 2, 2, 2)
    assert programs(w) == w.num_step_programs()
    assert len(compiles) - n_before == sum(w.num_step_programs())

    rng = np.random.default_rng(13)
    after_warmup = len(compiles)
    live = []
    for _ in range(40):
        op = rng.integers(0, 6)
        if op == 0 or len(live) < 2:
            live.append(run(w.prefill(fj.PrefillInput(input_ids=prompt(int(rng.integers(1, 120)), int(rng.integers(1e6)))[None]))).kv_cache)
        elif op == 1:
            hs = [live[i] for i in rng.choice(len(live), size=min(len(live), int(rng.integers(1, 5))), replace=False)]
            run(w.batch_decode([fj.DecodeInput(input_ids=ids(2), kv_cache=h) for h in hs]))
        elif op == 2:
            fresh = w.new_kv_cache()
            items = [fj.UnifiedBatchItem("d", [3], live[-1], live[-1].num_tokens, True),
                     fj.UnifiedBatchItem("p", prompt(int(rng.integers(1, 31))).tolist(), fresh, 0, bool(rng.integers(2)))]
            run(w.unified_decode(fj.UnifiedBatch(items=items)))
            live.append(fresh)
        elif op == 3:
            h = live[-1]
            run(w.forward_verify([fj.DecodeInput(input_ids=ids(t), kv_cache=h) for t in range(int(rng.integers(1, 6)))]))
        elif op == 4:
            run(w.batch_prefill([fj.PrefillInput(input_ids=prompt(int(rng.integers(1, 30)))[None]) for _ in range(int(rng.integers(1, 5)))]))
        else:
            fresh = w.new_kv_cache()
            items = [fj.UnifiedBatchItem("d", [3], live[-1], live[-1].num_tokens, True),
                     fj.UnifiedBatchItem("p", prompt(int(rng.integers(1, 20))).tolist(), fresh, 0, True)]
            rows = [SamplingRow(temperature=0.7, top_p=0.9, seed=5, history=prompt(30)), SamplingRow()]
            w.sample_unified(items, rows)
            live.append(fresh)
            n = int(rng.integers(1, 33))
            w.distribution(np.zeros((n, VOCAB), np.float32), [SamplingRow(temperature=0.5)] * n)
        while w.num_used_pages > w.num_total_pages // 2 and live:
            w.release_cache(live.pop(0).cache_id)
        for h in list(live):
            if h.num_tokens > 100:
                w.release_cache(h.cache_id)
                live.remove(h)
    assert len(compiles) == after_warmup, "a warmed-up executor compiled a new program"
    assert programs(w) == w.num_step_programs()


def test_sampling_warmup_covers_every_engine_step(no_persistent_cache):
    """The server warms only the "sample" family (program_plan.target_programs): ragged mixes of
    prefill chunks and decodes through `sample_unified` then compile nothing."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, _d, **_: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    w = fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **{**LIMITS, "max_batch_size": 4, "max_num_batched_tokens": 32})
    run(w.warmup(("sample",)))
    assert w.num_step_programs(("sample",)) == (len(w.buckets.shapes(all_rows=False)), len(w.buckets.row_buckets), 0)
    assert programs(w) == w.num_step_programs(("sample",))
    after_warmup = len(compiles)
    rng = np.random.default_rng(5)
    live = []
    for _ in range(25):
        items = [fj.UnifiedBatchItem(f"d{i}", [3], h, h.num_tokens, True) for i, h in enumerate(live[:3])]
        if len(live) < 4 and rng.integers(2):
            fresh = w.new_kv_cache()
            n = int(rng.integers(1, 32 - len(items)))
            items.append(fj.UnifiedBatchItem("p", prompt(n).tolist(), fresh, 0, bool(rng.integers(2))))
            live.append(fresh)
        if items:
            finals = sum(i.is_final_chunk for i in items)
            w.sample_unified(items, [SamplingRow(temperature=float(rng.integers(2)), seed=1)] * finals)
        for h in [h for h in live if h.num_tokens > 40]:
            w.release_cache(h.cache_id)
            live.remove(h)
    assert len(compiles) == after_warmup, "a sampling-warmed executor compiled a new program"
    with pytest.raises(fj.InvalidConfigError, match=r"program families \['logits'\] are not among"):
        run(w.warmup(("logits",)))


def test_status_capabilities_and_memory_from_config(clean):
    ex = clean
    s0 = ex.status()
    run(ex.prefill(fj.PrefillInput(input_ids=ids(1, 2, 3))))
    s1 = ex.status()
    assert s1.prefill_operations == s0.prefill_operations + 1 and s1.avg_prefill_time_ms > 0
    assert s1.state == fj.ExecutorState.READY and s1.is_ready
    caps = ex.capabilities()
    assert caps.max_batch_size == 4 and caps.max_sequence_length == 128
    assert fj.AttentionType.PAGED in caps.attention_mechanisms
    assert fj.AttentionType.GROUPED_QUERY in caps.attention_mechanisms  # 4 q heads over 2 kv heads
    mem = caps.memory_requirements
    # tiny.yaml by hand: embed 320*128 + lm_head 128*320 + final norm 128 + 2 layers of
    # (q 128*128 + k,v 128*64 each + o 128*128 + mlp 3*128*384 + 2 norms 128), float32.
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128
    assert mem.parameter_memory == 4 * (2 * 320 * 128 + 128 + 2 * per_layer)
    assert mem.kv_cache_memory_per_token == 2 * 2 * 32 * 4  # K+V, 2 kv heads, head_dim 32, f32
    m = ex.metrics()
    assert m.total_operations == s1.prefill_operations + s1.decode_operations and m.p95_prefill_latency > 0


def test_orbax_checkpoint_round_trip(tmp_path, clean):
    ex = clean
    ex.save_checkpoint(tmp_path / "ckpt")
    back = fj.JaxModelExecutor.from_pretrained(tmp_path / "ckpt", dtype="float32", **LIMITS)
    p = prompt(20, 14)
    a = run(ex.prefill(fj.PrefillInput(input_ids=p[None])))
    b = run(back.prefill(fj.PrefillInput(input_ids=p[None])))
    np.testing.assert_array_equal(a.logits, b.logits)
    # Another dtype casts on restore: every parameter is the float32 one rounded to bfloat16.
    cast = fj.JaxModelExecutor.from_pretrained(tmp_path / "ckpt", dtype="bfloat16", **LIMITS)
    src, got = flatten_state(ex._state), flatten_state(cast._state)
    assert set(got) == set(src)
    for name, value in got.items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(value), np.asarray(src[name]).astype(jnp.bfloat16))


def test_shutdown_refuses_further_work():
    s = fj.JaxModelExecutor.from_preset("tiny", dtype="float32", **LIMITS)
    h = run(s.prefill(fj.PrefillInput(input_ids=ids(1, 2)))).kv_cache
    run(s.shutdown())
    assert s.status().state == fj.ExecutorState.SHUTDOWN and s.num_used_pages == 0
    with pytest.raises(fj.BackendError, match="shut down"):
        run(s.decode(fj.DecodeInput(input_ids=ids(1), kv_cache=h)))


def test_second_process_loads_every_step_program_from_the_store(tmp_path):
    """warmup in a fresh process with the same cache dir loads every program from the program
    store: no compile, and (unlike XLA's own cache) no tracing either."""
    import subprocess
    import sys

    code = (
        "import asyncio, time, jax\n"
        "from jax import monitoring\n"
        "seen = []\n"
        "monitoring.register_event_listener(lambda name, **kw: seen.append(name))\n"
        "monitoring.register_event_duration_secs_listener(lambda name, d, **kw: seen.append(name))\n"
        "import ferrum_jax as fj\n"
        "from ferrum_jax.executor.program_store import STORE_HIT_EVENT\n"
        "ex = fj.JaxModelExecutor.from_preset('tiny', dtype='float32', max_batch_size=2, max_sequence_length=64,"
        " page_size=8, max_num_batched_tokens=16)\n"
        "ex._kv\n"  # wait for the KV pool, zeroed in the background
        "seen.clear()\n"  # building the random weights and the KV pool compiles too; not counted
        "asyncio.run(ex.warmup())\n"
        "print(sum(ex.num_step_programs()), seen.count(STORE_HIT_EVENT),"
        " seen.count('/jax/core/compile/backend_compile_duration'), seen.count('/jax/core/compile/tracing_duration'))\n"
        "out = asyncio.run(ex.prefill(fj.PrefillInput(input_ids=__import__('numpy').array([[1, 2, 3]], 'int32'))))\n"
        "print(int(out.last_token_logits().argmax()))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["FERRUM_JAX_CACHE_DIR"] = str(tmp_path / "xla")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (r.stdout.split("\n") for r in runs)
    programs, first_hits, first_compiles, _ = map(int, first[0].split())
    _, hits, compiles, traces = map(int, second[0].split())
    assert first_hits == 0 and first_compiles >= programs
    assert hits == programs and compiles == 0 and traces == 0
    assert first[1] == second[1]  # the loaded programs compute what the compiled ones did


def test_program_store_skips_executables_jax_handed_back_from_its_caches(tmp_path):
    """A program first compiled by a plain jit comes back from XLA's persistent cache in a later
    process, then from JAX's in-process cache to the executor: such an executable runs, but a
    serialized copy of it lacks its compiled functions ("NOT_FOUND: Function ... not found" in the
    next process). The store must leave it alone; the third process must compute correctly."""
    import os
    import shutil
    import subprocess
    import sys

    code = (
        "import sys, jax, numpy as np, ferrum_jax as fj\n"
        "from ferrum_jax.step.sampling import SamplingRow, build_sampling_batch, sampling_probs\n"
        "ex = fj.JaxModelExecutor.from_preset('tiny', max_batch_size=2, max_sequence_length=64)\n"
        "rows, V = 3, ex.cfg.vocab_size\n"
        "if sys.argv[1] == 'prime':\n"
        "    n = ex.buckets.token_bucket(rows)\n"
        "    jax.jit(sampling_probs)(np.zeros((n, V), np.float32),"
        " build_sampling_batch([SamplingRow()] * rows, n, ex.max_sequence_length, V))\n"
        "print(float(ex.distribution(np.zeros((rows, V), np.float32), [SamplingRow()] * rows).sum()))\n"
    )
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}

    def run(mode):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.split()[-1])

    assert run("prime") == 3.0
    shutil.rmtree(tmp_path / "xla" / "programs", ignore_errors=True)
    assert run("prime") == 3.0  # XLA's cache hit, reused by the executor's compile
    assert run("plain") == 3.0


def test_unknown_preset_lists_only_model_presets():
    with pytest.raises(fj.InvalidConfigError, match=r"unknown preset 'llama3_8b_gpu'; known presets: \['bench_125m', 'tiny'\]"):
        fj.JaxModelExecutor.from_preset("llama3_8b_gpu")
