"""Sliding-window layers hold only the KV their window can still read (kv.layout).

Hand counts of the layout (Gemma-3-27B's groups and its pages at 32k tokens against the issue's
goal) and of the host bookkeeping (pages given back, prefix matches shortened to what the window
groups still hold, truncations refused below them); then a tiny random Gemma 3 whose window (8)
is one page, against HF transformers: decode past the window, a prefix hit, a copy-on-write
truncation and the engine's continuous batching give HF's logits and tokens while the pages
each sequence holds follow the hand count.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import ferrum_jax as fj
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
from ferrum_jax.executor.sequence_table import PASSED, SequenceTable
from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.registry import model_config
from gemma_models import build, hf_logits, prompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
PAGE = 8
WINDOW = 8  # gemma_models' window
LIMITS = dict(dtype="float32", page_size=PAGE, max_batch_size=4, max_sequence_length=96, max_num_batched_tokens=64)


def _config(name: str) -> ModelConfig:
    return model_config(json.loads((CONFIGS / name / "config.json").read_text()))


def test_uniform_model_is_one_group_with_a_slot_per_layer():
    layout = kv_layout(_config("llama-3-8b"))
    assert layout.num_groups == 1 and layout.windows == (None,) and layout.slots == 32
    assert [layout.place(i) for i in range(32)] == [(0, i) for i in range(32)]


def test_gemma3_27b_groups_and_its_pages_at_32k_meet_the_goal():
    cfg = _config("gemma-3-27b")
    layout = kv_layout(cfg)
    # Ten 6-layer blocks (five local, one global), then two local layers: a group per block
    # position and one for the trailing loop, ten slots (the blocks).
    assert layout.slots == 10 and layout.windows == (1024,) * 5 + (None, 1024)
    assert layout.place(5) == (5, 0) and layout.place(59) == (5, 9) and layout.place(61) == (6, 1)
    assert sorted(layout.place(i) for i in range(62)) == sorted(set(layout.place(i) for i in range(62)))
    # At 32768 tokens of 16: the global group every page (2048), each of the six local groups
    # the 65 pages a window of 1024 positions straddles when it does not start on a page.
    assert layout.pages_held(32768, 16, 1) == 2048 + 6 * 65
    ratio = (2048 + 6 * 65) * 10 / (2048 * 62)
    goal = 1 / 6 + 5 / 6 * 1024 / 32768
    assert ratio == pytest.approx(0.19200, abs=1e-5) and ratio <= goal


def test_grouping_that_pads_too_much_falls_back_to_one_global_group():
    base = dict(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2,
                num_kv_heads=1, head_dim=16)  # fmt: skip
    mixed = kv_layout(ModelConfig(**base, num_layers=28, sliding_windows=(None,) * 4 + (64,) * 24))
    assert mixed.windows == (None,) and mixed.slots == 28 and mixed.place(27) == (0, 27)
    alike = kv_layout(ModelConfig(**base, num_layers=4, sliding_windows=(64,) * 4))
    assert alike.windows == (64,) and alike.slots == 4


def test_window_groups_give_pages_back_and_prefix_matches_shorten_to_what_they_hold():
    """Page size 4, window 8: a query at position q reads positions q-7 .. q."""
    table = SequenceTable(PageAllocator(40), 4, 64, prefix_caching=True, windows=(None, 8))
    ids = list(range(100, 131))
    a = table.create()
    table.reserve([(a, 30)])
    table.append(a, ids[:30])  # seven full pages named
    assert table.allocator.num_used == 16
    # The next query (position 30) reads from 23: group 1's pages 0..4 go back (named: cached).
    assert table.pages_needed(a, 31) == -5
    table.reserve([(a, 31)])
    assert a.tables[1] == [PASSED] * 5 + a.tables[1][5:] and table.allocator.num_used == 8 + 3
    assert table.allocator.num_evictable == 5
    # 21 tokens match five pages: the query at 20 reads from 13, page 3 on of group 1: cached.
    match = table.cache.match(ids[:21])
    assert match.num_tokens == 20 and match.pages[1] == (0, 0, 0, *match.pages[1][3:])
    # Evicting the two pages given back last (group 1's pages 4 and 3) leaves page 2's window:
    # the longest match whose window group pages are all cached is three pages.
    table.allocator.allocate(table.allocator.num_empty + 2)
    assert table.cache.match(ids[:21]).num_tokens == 12
    with pytest.raises(fj.FerrumError, match="sliding window 8 from position 20 on"):
        table.truncate(a, 10)
    table.truncate(a, 29)  # reads from 22: page 5 on, held


def test_a_rollback_allowance_keeps_what_a_truncation_to_the_verified_token_reads():
    """Page size 4, window 8, speculation verifying 4 tokens at a time (allow_rollback(5)): after
    a verify wrote positions 30..34, the engine may keep only position 30, whose successor (31)
    reads from 24 -- page 6 on. The give-back before the next step keeps what a query at
    35 - 5 = 30 reads (from 23: page 5 on), so the truncation to 31 tokens is allowed; without
    the allowance page 6 (positions 24..27) went back at once and the same truncation is refused."""
    for rollback, kept_from in ((5, 5), (0, 7)):
        table = SequenceTable(PageAllocator(40), 4, 64, prefix_caching=False, windows=(None, 8))
        table.rollback_tokens = rollback
        a = table.create()
        table.reserve([(a, 35)])
        table.append(a, list(range(35)))
        table.give_back_passed(a)
        assert a.tables[1][:kept_from] == [PASSED] * kept_from and a.tables[1][kept_from] != PASSED
        if rollback:
            table.truncate(a, 31)
        else:
            with pytest.raises(fj.FerrumError, match="sliding window 8 from position 28 on"):
                table.truncate(a, 31)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    # Two local layers then a global one, twice: three KV groups of two slots.
    return build("gemma3_3x2", tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def ex(gemma):
    ex = fj.JaxModelExecutor.from_pretrained(gemma[0], **LIMITS)
    assert ex.kv_layout.windows == (WINDOW, WINDOW, None) and ex.kv_layout.slots == 2
    return ex


def held_pages(n: int) -> int:
    """Pages a sequence of n tokens holds after its last step: the global group all, each of
    the two local groups those from the page of position n-7 on (the next query, at n, reads
    positions n-7 .. n)."""
    return -(-n // PAGE) + 2 * (-(-n // PAGE) - (n - (WINDOW - 1)) // PAGE)


def greedy_hf(model, ids: np.ndarray, n: int) -> list[int]:
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t = torch.from_numpy(ids.astype(np.int64))
        return model.generate(t, attention_mask=torch.ones_like(t), generation_config=gen)[0, ids.shape[1]:].tolist()


def assert_close(ours, ref):
    err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"rel err {err:.2e}"


def test_decode_past_the_window_gives_pages_back_and_keeps_hf_logits(gemma, ex):
    _, model = gemma
    ids = prompt(30)
    tail = np.random.default_rng(3).integers(3, 300, 20).astype(np.int32)
    want = hf_logits(model, np.concatenate([ids[0], tail])[None])

    async def go():
        out = await ex.prefill(fj.PrefillInput(input_ids=ids))
        handle, steps, used = out.kv_cache, [], []
        for tok in tail:
            d = await ex.decode(fj.DecodeInput(input_ids=np.array([[tok]], np.int32), kv_cache=handle))
            steps.append(np.asarray(d.logits)[0])
            used.append(ex.num_used_pages)
        return handle, np.stack(steps), used

    handle, steps, used = asyncio.run(go())
    assert_close(steps, want[30:])
    assert used == [held_pages(n) for n in range(31, 51)]
    assert used[-1] == 7 + 2 * 2  # 50 tokens: 7 global pages, pages 5 and 6 of each local group
    with pytest.raises(fj.FerrumError, match="sliding window 8"):
        ex.truncate(handle, 20)
    ex.release_cache(handle.cache_id)
    assert ex.num_used_pages == 0


def test_prefix_hit_and_copy_on_write_truncation_across_groups(gemma, ex):
    _, model = gemma
    ids = prompt(40)[0].tolist()
    other = np.random.default_rng(4).integers(3, 300, 9).tolist()
    a = ex.new_kv_cache()
    ex.extend([(a, ids)], "last")  # then the local groups give back pages 0..3 (position 40 reads from 33)
    match = ex.match_prefix(ids + other)  # five pages; the local groups only page 4, which a holds
    assert match.num_tokens == 40 and [t.count(0) for t in match.pages] == [4, 4, 0]
    b = ex.new_kv_cache(prefix=match)
    ex.truncate(b, 39)  # inside page 4, which a holds in every group: three copies
    assert all(tb[4] not in (0, ta[4]) for tb, ta in zip(b.page_tables, a.page_tables))
    (got,) = ex.extend([(b, other)], "all")
    assert_close(got, hf_logits(model, np.array([ids[:39] + other]))[39:])
    (got_a,) = ex.extend([(a, other)], "all")  # a's pages untouched
    assert_close(got_a, hf_logits(model, np.array([ids + other]))[40:])
    ex.release_cache(a.cache_id)
    ex.release_cache(b.cache_id)
    assert ex.num_used_pages == 0


def test_engine_serves_long_and_prefix_sharing_requests_as_hf_generates(gemma, ex):
    _, model = gemma
    prompts = [prompt(n) for n in (45, 12, 30)] + [prompt(45)]  # the last repeats the first: a prefix hit
    want = [greedy_hf(model, p, 20) for p in prompts]

    async def go():
        eng = Engine(ex, EngineConfig())
        await eng.start()
        try:
            async def one(i, p):
                toks = []
                async for out in eng.add_request(f"r{i}", p[0].tolist(), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)):
                    toks += out.new_token_ids
                return toks

            first = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts[:3])])
            return first + [await one(3, prompts[3])]
        finally:
            await eng.stop()

    assert asyncio.run(go()) == want
    assert ex.num_used_pages == 0 and ex.prefix_cache_tokens[1] >= 40
