"""On-device sampling against hand-computed oracles (numpy softmax, explicit penalty
arithmetic, chi-square on empirical frequencies)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ferrum_jax.step.sampling import SamplingRow, apply_penalties, argmax_rows, build_sampling_batch, sample

V = 8
LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, 0.2], np.float32)
sample_jit = jax.jit(sample)


def draw(rows, logits=LOGITS, history_len=16, allowed=None):
    batch = build_sampling_batch(rows, len(rows), history_len, V, allowed)
    out = sample_jit(np.broadcast_to(logits, (len(rows), V)).astype(np.float32), batch)
    return jax.tree.map(np.asarray, out)


def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def test_greedy_and_logprobs():
    out = draw([SamplingRow()])
    assert out.token_ids[0] == 6
    want = np.log(softmax(LOGITS.astype(np.float64)))
    np.testing.assert_allclose(out.logprobs[0], want[6], rtol=1e-5)
    np.testing.assert_array_equal(out.top_ids[0][:3], [6, 0, 1])
    np.testing.assert_allclose(out.top_logprobs[0][:3], want[[6, 0, 1]], rtol=1e-5)


def test_penalties_match_hand_arithmetic():
    # prompt [0], output [6, 6, 1]: repetition 2 over {0, 1, 6}; frequency 0.5 x counts; presence 1.
    row = SamplingRow(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0,
                      history=np.array([0, 6, 6, 1], np.int32), num_prompt=1)
    hand = LOGITS.astype(np.float64).copy()
    hand[[0, 1, 6]] /= 2.0  # all positive: divided
    hand[6] -= 0.5 * 2 + 1.0
    hand[1] -= 0.5 * 1 + 1.0
    got = apply_penalties(LOGITS[None], build_sampling_batch([row], 1, 16, V))
    np.testing.assert_allclose(np.asarray(got)[0], hand, rtol=1e-6)
    negative = SamplingRow(repetition_penalty=2.0, history=np.array([5], np.int32), num_prompt=1)
    got = np.asarray(apply_penalties(LOGITS[None], build_sampling_batch([negative], 1, 16, V)))[0]
    assert got[5] == -2.0  # a negative logit is multiplied
    assert draw([row]).token_ids[0] == int(np.argmax(hand))


def packed(allowed_ids, vocab):
    """The llguidance/xgrammar layout, packed by hand: bit t % 32 of word t // 32."""
    words = np.zeros(-(-vocab // 32), np.uint32)
    for t in allowed_ids:
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return words.view(np.int32)


def test_bitmask_restricts_draws_and_leaves_other_rows_alone():
    allowed = np.stack([packed([1, 3], V), np.full(1, -1, np.int32), packed([5], V)])
    rows = [SamplingRow(temperature=1.0, seed=7), SamplingRow(), SamplingRow(temperature=0.8, top_p=0.9, seed=3)]
    for seed in range(50):
        rows[0] = SamplingRow(temperature=1.0, seed=seed)
        out = draw(rows, allowed=allowed)
        assert out.token_ids[0] in (1, 3)
        assert out.token_ids[1] == 6  # unconstrained greedy: the plain argmax
        assert out.token_ids[2] == 5
    # Logprobs stay the raw model's (vLLM's default), not the masked distribution's.
    want = np.log(softmax(LOGITS.astype(np.float64)))
    np.testing.assert_allclose(out.logprobs[2], want[5], rtol=1e-5)


def test_bitmask_over_a_vocab_that_is_not_a_multiple_of_32():
    vocab = 70
    logits = np.linspace(0, 1, vocab, dtype=np.float32)  # argmax 69, in the third, partial word
    allowed = np.stack([packed([33, 64], vocab), packed(range(vocab), vocab)])
    batch = build_sampling_batch([SamplingRow(), SamplingRow()], 2, 4, vocab, allowed)
    out = sample_jit(np.broadcast_to(logits, (2, vocab)), batch)
    np.testing.assert_array_equal(np.asarray(out.token_ids), [64, 69])


def test_banned_tokens_are_never_drawn():
    rows = [SamplingRow(temperature=1.0, seed=s, banned=(6, 0)) for s in range(200)]
    out = draw(rows)
    assert not np.isin(out.token_ids, [6, 0]).any()
    assert draw([SamplingRow(banned=(6,))]).token_ids[0] == 0


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_temperature_sampling_matches_softmax(temperature):
    n = 4000
    rows = [SamplingRow(temperature=temperature, seed=s) for s in range(n)]
    counts = np.bincount(draw(rows).token_ids, minlength=V)
    p = softmax(LOGITS.astype(np.float64) / temperature)
    expected = n * p
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001, so a correct sampler fails 1 run in 1000.
    assert chi2 < 24.3, (counts, expected)


def test_top_k_top_p_min_p_restrict_the_support():
    n = 600
    p = softmax(LOGITS.astype(np.float64))
    for row_kw, allowed in [
        (dict(top_k=2), {6, 0}),
        (dict(top_p=0.5), {6}),  # p(6) = 0.56 > 0.5 alone
        (dict(top_p=0.8), {6, 0, 1}),  # mass before token 1 is p6 + p0 = 0.77 < 0.8: it stays
        (dict(min_p=0.3), {6, 0}),  # p(0)/p(6) = e^-1 = 0.37 >= 0.3, p(1)/p(6) = e^-2 < 0.3
    ]:
        got = set(draw([SamplingRow(temperature=1.0, seed=s, **row_kw) for s in range(n)]).token_ids.tolist())
        assert got == allowed, (row_kw, got)
    assert p[6] + p[0] < 0.8 < p[6] + p[0] + p[1]


def test_top_k_top_p_support_on_a_large_vocabulary_matches_the_sorted_definition():
    """The support of the sampled distribution over 49152 random logits against a float64 numpy
    oracle that sorts: top-k by rank, then top-p keeping a token while the mass of the tokens
    sorted before it is below top_p."""
    from ferrum_jax.step.sampling import sampling_probs

    rng = np.random.default_rng(7)
    vocab = 49152
    settings = [(0, 0.5), (0, 0.9), (0, 0.01), (1, 1.0), (5, 1.0), (50, 0.9), (1000, 0.5), (vocab, 0.3), (3000, 0.99), (0, 1.0)]
    logits = (rng.normal(size=(len(settings), vocab)) * 3).astype(np.float32)
    rows = [SamplingRow(temperature=1.0, top_k=k, top_p=p) for k, p in settings]
    support = np.asarray(jax.jit(sampling_probs)(logits, build_sampling_batch(rows, len(rows), 16, vocab))) > 0
    for i, (k, p) in enumerate(settings):
        order = np.argsort(-logits[i].astype(np.float64), kind="stable")
        kept = order[: k or vocab]
        probs = softmax(logits[i].astype(np.float64)[kept])
        kept = kept[np.cumsum(probs) - probs < p] if p < 1 else kept
        assert set(np.flatnonzero(support[i]).tolist()) == set(kept.tolist()), (k, p)


def test_seeded_draws_depend_on_seed_and_step_only():
    a = draw([SamplingRow(temperature=1.0, seed=42, step=3)] + [SamplingRow(temperature=1.0, seed=s) for s in range(5)])
    b = draw([SamplingRow(temperature=1.0, seed=s) for s in range(7)] + [SamplingRow(temperature=1.0, seed=42, step=3)])
    assert a.token_ids[0] == b.token_ids[-1]
    steps = draw([SamplingRow(temperature=1.0, seed=42, step=k) for k in range(50)]).token_ids
    assert len(set(steps.tolist())) > 1


@pytest.mark.parametrize("vocab", [7, 1024, 2500, 49152])
def test_argmax_rows_is_numpys_argmax(vocab):
    """First index of the maximum, as numpy's argmax: ties (coarse values), a row of -inf, a
    maximum in the last chunk, vocabularies below, at and off a chunk multiple."""
    rng = np.random.default_rng(vocab)
    x = np.round(rng.standard_normal((6, vocab)), 1).astype(np.float32)
    x[1] = -np.inf
    x[2, -1] = 100.0
    x[3, : vocab // 2] = 5.0  # ties across chunks: the first wins
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax_rows)(x)), np.argmax(x, axis=-1))
