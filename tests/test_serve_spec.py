"""Speculative decoding through the server: the `--speculative-*` flags and their checks,
and live servers with n-gram lookup, with a draft model of other random weights
(`preset:tiny:7`: drafts are rejected) and with the target itself as draft (`preset:tiny:0`,
the served model's own seed: every greedy draft is accepted), whose greedy output is, token
for token, the executor's own greedy decode, for a batch of concurrent requests of
different lengths; the `ferrum:spec_decode_*` metrics count what was drafted and accepted.

The servers use the suite's `SERVER_LIMITS`, so both they and the draft model (same
architecture, same limits) load every step program from the compilation cache."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from serve_fixtures import MODEL, REPO, random_prompt, reference_greedy, shared_server
from ferrum_jax.serve.settings import DEFAULT_SPECULATIVE_TOKENS, parse_settings

K = 3
NGRAM = ["--speculative-method", "ngram", "--num-speculative-tokens", str(K)]
DRAFT = ["--speculative-method", "draft", "--speculative-model", "preset:tiny:7", "--num-speculative-tokens", str(K)]
SELF_DRAFT = ["--speculative-method", "draft", "--speculative-model", "preset:tiny:0", "--num-speculative-tokens", str(K)]
MAX_TOKENS = 24
SPEC_METRICS = (
    "ferrum:spec_decode_num_drafts_total",
    "ferrum:spec_decode_num_draft_tokens_total",
    "ferrum:spec_decode_num_accepted_tokens_total",
    "ferrum:spec_decode_mean_acceptance_length",
)

# ---------------------------------------------------------------------------- flags


def test_a_method_turns_speculation_on_with_default_tokens():
    assert parse_settings([]).speculative_tokens == 0
    assert parse_settings(["--num-speculative-tokens", "0"]).speculative_tokens == 0
    s = parse_settings(["--speculative-method", "ngram"])
    assert (s.speculative_tokens, s.ngram_max, s.ngram_min) == (DEFAULT_SPECULATIVE_TOKENS, 4, 1)
    s = parse_settings(NGRAM + ["--ngram-prompt-lookup-max", "3", "--ngram-prompt-lookup-min", "2"])
    assert (s.speculative_tokens, s.ngram_max, s.ngram_min) == (K, 3, 2)
    assert parse_settings(DRAFT).speculative_model == "preset:tiny:7"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speculative-method", "eagle"], "invalid choice: 'eagle'"),
        (["--speculative-method", "ngram", "--num-speculative-tokens", "0"], "needs --num-speculative-tokens >= 1"),
        (["--num-speculative-tokens", "-1"], "must be >= 0"),
        (["--num-speculative-tokens", "4"], "--num-speculative-tokens needs --speculative-method"),
        (["--speculative-method", "draft"], "--speculative-method draft needs --speculative-model"),
        (["--speculative-model", "preset:tiny:7"], "--speculative-model needs --speculative-method"),
        (["--speculative-method", "ngram", "--speculative-model", "x"], "--speculative-model only applies to --speculative-method draft"),
        (DRAFT + ["--ngram-prompt-lookup-max", "3"], "--ngram-prompt-lookup-max only applies to --speculative-method ngram"),
        (NGRAM + ["--ngram-prompt-lookup-min", "5"], "need 1 <= min <= max"),
    ],
    ids=["bad method", "zero tokens", "negative tokens", "tokens alone", "draft alone", "model alone", "ngram model", "draft ngram", "min > max"],
)
def test_bad_speculative_flags_are_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_speculative_settings_in_a_config_file_are_checked_too(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("speculative-method: draft\nnum-speculative-tokens: 2\n")
    with pytest.raises(SystemExit):
        parse_settings(["--config", str(path)])
    assert "needs --speculative-model" in capsys.readouterr().err
    assert parse_settings(["--config", str(path), "--speculative-model", "preset:tiny:7"]).speculative_tokens == 2


def test_the_server_exits_with_the_message_before_loading_anything():
    r = subprocess.run(
        [sys.executable, "-m", "ferrum_jax.serve", "--speculative-method", "draft"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "--speculative-method draft needs --speculative-model" in r.stderr


# ---------------------------------------------------------------------------- live servers


def _prompts() -> list[list[int]]:
    """Different lengths, and text that repeats itself (what n-gram lookup is for)."""
    rng = np.random.default_rng(5)
    quoted = list(b"the cat sat on the mat; the cat sat on the ")
    return [random_prompt(rng, 5), quoted, random_prompt(rng, 40), quoted * 2, random_prompt(rng, 17), random_prompt(rng, 90)]


def _greedy_batch(server, prompts: list[list[int]]) -> list[list[int]]:
    async def run():
        client = server.async_client()
        replies = await asyncio.gather(
            *(
                client.completions.create(
                    model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
                )
                for p in prompts
            )
        )
        return [r.choices[0].token_ids for r in replies]

    return asyncio.run(run())


@pytest.mark.parametrize("flags", [NGRAM, DRAFT, SELF_DRAFT], ids=["ngram", "draft model", "target as draft"])
def test_greedy_output_is_the_executors_and_drafts_are_counted(flags):
    server = shared_server(flags)
    before = server.metrics()
    assert all(name in before for name in SPEC_METRICS)
    prompts = _prompts()
    got = _greedy_batch(server, prompts)
    for prompt, tokens in zip(prompts, got):
        assert tokens == reference_greedy(prompt, MAX_TOKENS), f"prompt of {len(prompt)} tokens"
    after = server.wait_idle()
    drafts, drafted, accepted = (after[name] - before[name] for name in SPEC_METRICS[:3])
    assert drafted > 0 and drafts > 0 and 0 <= accepted <= drafted <= K * drafts
    # Every token was emitted once: by a verify, or by the step that finished a prefill.
    assert after["ferrum:generation_tokens_total"] - before["ferrum:generation_tokens_total"] == len(prompts) * MAX_TOKENS
    total_drafts, total_accepted = (after[name] for name in (SPEC_METRICS[0], SPEC_METRICS[2]))
    assert after["ferrum:spec_decode_mean_acceptance_length"] == pytest.approx(1 + total_accepted / total_drafts)
    if flags is SELF_DRAFT:
        assert accepted == drafted


def test_ngram_lookup_accepts_drafts_on_repetitive_text():
    server = shared_server(NGRAM)
    before = server.metrics()["ferrum:spec_decode_num_accepted_tokens_total"]
    _greedy_batch(server, [list(b"abcdefgh" * 8)])
    assert server.wait_idle()["ferrum:spec_decode_num_accepted_tokens_total"] > before
