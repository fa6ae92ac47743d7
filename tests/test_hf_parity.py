"""ferrum_jax against HuggingFace transformers on the same checkpoint files.

The oracle is always the torch model built in `hf_models` (same weights the executor
loads from disk); nothing here compares ferrum_jax against its own earlier output.

Error measure: rel_err(ours, ref) = max|ours - ref| / max|ref|, required <= 1e-4,
plus np.allclose with atol = 1e-4 * max|ref| (the same bound, elementwise, so the
failure message points at the offending entries).
"""

from __future__ import annotations

import asyncio

import chex
import numpy as np
import pytest
import torch
import transformers

import ferrum_jax as fj
from hf_models import HFVariant, hf_variant, legacy_copy_matches, unsupported_dir  # noqa: F401  (fixtures)

PAGE_SIZE = 16
MAX_SEQ = 128
# 23 fits in two pages; 40 spans three, so the prompt itself crosses page boundaries
# and the continuation (40 + 32 = 72 tokens) crosses two more during decode.
PROMPT_LENGTHS = (23, 40)
NEW_TOKENS = 32
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def run():
    """Run a coroutine on one event loop for the whole module.

    The executor may hold loop-bound state (locks, queues), so every call must see
    the loop it was first used on; `asyncio.run` would make a fresh loop each time.
    """
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def executor(hf_variant: HFVariant):
    # One executor per variant: loading + compiling dominates the runtime.
    return fj.JaxModelExecutor.from_pretrained(
        str(hf_variant.path),
        dtype="float32",
        page_size=PAGE_SIZE,
        max_batch_size=4,
        max_sequence_length=MAX_SEQ,
    )


def prompt(variant: HFVariant, n: int, seed: int = 0) -> np.ndarray:
    # Ids >= 3 keep clear of pad/bos/eos, which some loaders treat specially.
    rng = np.random.default_rng(seed + n)
    return rng.integers(3, variant.vocab_size, size=(1, n), dtype=np.int32)


def hf_logits(variant: HFVariant, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return variant.model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def hf_greedy(variant: HFVariant, ids: np.ndarray) -> np.ndarray:
    """HF greedy continuation, exactly NEW_TOKENS long.

    The oracle has no eos (see `hf_models.save_variant`), so generation cannot stop
    early, and no min-length processor masks eos to -inf: that mask would change
    the argmax whenever eos is the top token, which ferrum_jax rightly keeps.
    """
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    t = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        out = variant.model.generate(t, attention_mask=torch.ones_like(t), generation_config=gen)
    assert out.shape == (1, ids.shape[1] + NEW_TOKENS)
    return out[0, ids.shape[1] :].numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_matches_hf(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = rel_err(ours, ref)
    assert err <= REL_TOL, f"{what}: rel_err {err:.3e} > {REL_TOL:.0e} (max|ref| = {np.max(np.abs(ref)):.3f})"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=REL_TOL * float(np.max(np.abs(ref))), err_msg=what)


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_prefill_logits_match_hf(hf_variant, executor, run, n):
    ids = prompt(hf_variant, n)
    out = run(executor.prefill(fj.PrefillInput(input_ids=ids)))
    try:
        logits = np.asarray(out.logits)
        chex.assert_shape(logits, (1, n, hf_variant.vocab_size))
        chex.assert_type(logits, np.float32)
        last = np.asarray(out.last_token_logits())
        chex.assert_shape(last, (1, hf_variant.vocab_size))
        np.testing.assert_array_equal(last, logits[:, -1])
        assert out.kv_cache.num_tokens == n

        assert_matches_hf(logits, hf_logits(hf_variant, ids), f"{hf_variant.name} prefill n={n}")
    finally:
        executor.release_cache(out.kv_cache.cache_id)


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_greedy_decode_matches_hf_generate(hf_variant, executor, run, n):
    ids = prompt(hf_variant, n)
    vocab = hf_variant.vocab_size
    out = run(executor.prefill(fj.PrefillInput(input_ids=ids)))
    cache = out.kv_cache
    try:
        tokens = [int(np.argmax(out.last_token_logits()[0]))]
        step_logits = []
        # Token 1 comes from prefill; each decode feeds the previous argmax and yields
        # the next, so NEW_TOKENS - 1 decodes complete the continuation.
        for i in range(1, NEW_TOKENS):
            d = run(executor.decode(fj.DecodeInput(input_ids=np.array([[tokens[-1]]], np.int32), kv_cache=cache)))
            cache = d.kv_cache
            logits = np.asarray(d.logits)
            chex.assert_shape(logits, (1, vocab))
            chex.assert_type(logits, np.float32)
            assert cache.num_tokens == n + i
            step_logits.append(logits[0])
            tokens.append(int(np.argmax(logits[0])))
    finally:
        executor.release_cache(cache.cache_id)

    # Decode logits first: HF run teacher-forced on our own sequence predicts every
    # step, so a numeric bug is reported at the step where it appears, even if the
    # greedy tokens happen to agree.
    ref = hf_logits(hf_variant, np.concatenate([ids, np.array([tokens], np.int32)], axis=1))[0]
    for i, ours in enumerate(step_logits, start=1):
        assert_matches_hf(ours, ref[n - 1 + i], f"{hf_variant.name} n={n} decode step {i}")

    expected = hf_greedy(hf_variant, ids)
    if not np.array_equal(tokens, expected):
        k = int(np.argmax(np.asarray(tokens) != expected))
        top2 = np.sort(ref[n - 1 + k])[-2:]
        pytest.fail(
            f"{hf_variant.name} n={n}: greedy diverges from HF generate at new token {k} "
            f"(ours {tokens[k]}, HF {expected[k]}; HF top-2 margin there {top2[1] - top2[0]:.2e})\n"
            f"ours {tokens}\nHF   {expected.tolist()}"
        )


def test_batched_prefill_and_decode_match_hf(hf_variant, executor, run):
    """Ragged prompts in one batch: each row must match HF run on that prompt alone,
    which catches cross-sequence leakage through padding, masks or page tables."""
    lengths = (5, 17, 33)
    prompts = [prompt(hf_variant, n, seed=7) for n in lengths]
    outs = run(executor.batch_prefill([fj.PrefillInput(input_ids=p) for p in prompts]))
    caches = [o.kv_cache for o in outs]
    try:
        seqs = [list(p[0]) for p in prompts]
        for o, p, s in zip(outs, prompts, seqs):
            assert_matches_hf(np.asarray(o.logits), hf_logits(hf_variant, p), f"{hf_variant.name} batch_prefill n={p.shape[1]}")
            s.append(int(np.argmax(o.last_token_logits()[0])))
        for step in range(4):
            inputs = [fj.DecodeInput(input_ids=np.array([[s[-1]]], np.int32), kv_cache=c) for s, c in zip(seqs, caches)]
            ds = run(executor.batch_decode(inputs))
            caches = [d.kv_cache for d in ds]
            for d, s in zip(ds, seqs):
                ref = hf_logits(hf_variant, np.array([s], np.int32))[0, -1]
                assert_matches_hf(np.asarray(d.logits)[0], ref, f"{hf_variant.name} batch_decode step {step} len={len(s)}")
                s.append(int(np.argmax(np.asarray(d.logits)[0])))
    finally:
        for c in caches:
            executor.release_cache(c.cache_id)


def test_parameter_count_equals_hf(hf_variant, executor):
    """The count the family's declarations give (ModelInfo.num_parameters) is torch's."""
    assert executor.info().num_parameters == sum(p.numel() for p in hf_variant.model.parameters())


@pytest.mark.parametrize("hf_variant", ["llama3_legacy"], indirect=True)
def test_rewritten_rope_config_means_the_same_to_hf(hf_variant):
    # Guards the fixture: the legacy variant is only a loader test if transformers
    # itself reads the rewritten config.json back to the identical model.
    assert legacy_copy_matches(hf_variant)


def test_unsupported_architecture_raises(unsupported_dir):
    with pytest.raises(fj.FerrumError) as excinfo:
        fj.JaxModelExecutor.from_pretrained(str(unsupported_dir), dtype="float32", max_sequence_length=MAX_SEQ)
    assert "gpt2" in str(excinfo.value).lower(), f"error does not name the architecture: {excinfo.value!r}"
    assert excinfo.value.kind.value == "unsupported", f"expected kind 'unsupported', got {excinfo.value.kind}"
