"""Constrained decoding in the engine (tiny preset, byte tokenizer, in process): every
constrained output matches its constraint (checked by `re` / `json` / a hand list, not by the
grammar engine), unconstrained greedy requests that share the batch get the tokens the
executor's own argmax gives them alone, the bitmask the sampler gets allows exactly what a
hand count says, and a request whose grammar is complete stops."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
from ferrum_jax.engine.drafter import NgramDrafter
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.byte_tokenizer import ByteTokenizer
from ferrum_jax.serve.structured_outputs import grammar_tokenizer
from ferrum_jax.structured.compiler import GrammarCompiler, GrammarSpec
from ferrum_jax.structured.matcher import fill_bitmasks
from test_engine import greedy_reference
from test_quantization import all_logits

LIMITS = dict(dtype="float32", max_batch_size=8, max_sequence_length=128, page_size=8, max_num_batched_tokens=64)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def ex():
    return fj.JaxModelExecutor.from_preset("tiny", **LIMITS)


@pytest.fixture(scope="module")
def compiler(ex):
    return GrammarCompiler(grammar_tokenizer(TOK, ex.cfg.vocab_size))


def run(ex, requests, drafter=None, **config):
    """requests: (prompt ids, SamplingParams, grammar or None); per request (ids, finish_reason)."""

    async def go():
        eng = Engine(ex, EngineConfig(**config), drafter=drafter)
        await eng.start()
        try:
            streams = [eng.add_request(f"r{i}", p, sp, grammar=g) for i, (p, sp, g) in enumerate(requests)]
            outs = []
            for s in streams:
                ids, last = [], None
                async for o in s:
                    ids += o.new_token_ids
                    last = o
                outs.append((ids, last.finish_reason))
            return outs
        finally:
            await eng.stop()

    return asyncio.run(go())


def text(ids):
    return TOK.decode(ids)


SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "kind": {"enum": ["red", "blue"]}},
    "required": ["n", "kind"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{3}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe"]


def specs():
    return [
        GrammarSpec("json", json.dumps(SCHEMA), "p"),
        GrammarSpec("regex", REGEX, "p"),
        GrammarSpec("choice", json.dumps(CHOICES), "p"),
    ]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_mixed_batch_constrained_outputs_follow_their_grammar_and_greedy_neighbours_are_unchanged(ex, compiler, async_scheduling):
    prompt = TOK.encode("hello there")
    other = TOK.encode("an unconstrained neighbour")
    requests = []
    for seed in range(3):
        for spec in specs():
            requests.append((prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=seed), compiler.compile(spec)))
    requests.insert(2, (other, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), None))
    outs = run(ex, requests, async_scheduling=async_scheduling)
    neighbour_ids, reason = outs.pop(2)
    assert neighbour_ids == greedy_reference(ex, other, 24) and reason == "length"
    for k, (ids, reason) in enumerate(outs):
        kind = specs()[k % 3].kind
        assert reason == "stop", (kind, text(ids))
        if kind == "json":
            value = json.loads(text(ids))
            assert set(value) == {"n", "kind"} and 0 <= value["n"] <= 99 and value["kind"] in ("red", "blue")
        elif kind == "regex":
            assert re.fullmatch(REGEX, text(ids)), text(ids)
        else:
            assert text(ids) in CHOICES


def test_greedy_constrained_is_the_best_allowed_token_each_step(ex, compiler):
    """A greedy constrained run against a host oracle: at each step the argmax of the model's
    logits over the tokens the regex allows next, by a hand-written prefix check."""
    prompt = TOK.encode("code:")
    ((ids, reason),) = run(ex, [(prompt, SamplingParams(max_tokens=10, temperature=0.0), compiler.compile(specs()[1]))])
    assert reason == "stop" and re.fullmatch(REGEX, text(ids))
    classes = ["abc"] * 3 + ["-"] + ["0123456789"] * 2
    logits = all_logits(ex, prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    for step, (tok, row) in enumerate(zip(ids, logits)):
        allowed = [ord(c) for c in classes[step]]
        assert tok == allowed[int(np.argmax(row[allowed]))]


def test_bitmask_allows_exactly_the_next_bytes(ex, compiler):
    g = compiler.compile(GrammarSpec("choice", json.dumps(["cat", "cow", "dog"]), "p"))
    assert sorted(g.allowed_ids(ex.cfg.vocab_size)) == [ord("c"), ord("d")]
    assert g.accept(ord("c"))
    assert sorted(g.allowed_ids(ex.cfg.vocab_size)) == [ord("a"), ord("o")]
    mask = fill_bitmasks([(g, 1)], 3, ex.cfg.vocab_size)
    assert mask.shape == (3, -(-ex.cfg.vocab_size // 32)) and mask.dtype == np.int32
    assert (mask[0] == -1).all() and (mask[2] == -1).all()
    bits = np.unpackbits(mask[1].view(np.uint8), bitorder="little")
    assert np.nonzero(bits)[0].tolist() == [ord("a"), ord("o")]
    assert not g.accept(ord("x")) and g.terminated and g.error


def test_speculative_engine_does_not_draft_for_constrained_requests(ex, compiler):
    prompt = TOK.encode("abcabcabcabc")
    greedy = (prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), None)
    constrained = (prompt, SamplingParams(max_tokens=40, temperature=0.0), compiler.compile(specs()[0]))
    outs = run(ex, [greedy, constrained], drafter=NgramDrafter(), num_speculative_tokens=3)
    assert outs[0][0] == greedy_reference(ex, prompt, 16)
    value = json.loads(text(outs[1][0]))
    assert set(value) == {"n", "kind"}


@pytest.mark.parametrize(
    "spec, problem",
    [
        (GrammarSpec("json", '{"type": "foo"}', "response_format"), "foo"),
        (GrammarSpec("regex", "(unclosed", "structured_outputs.regex"), "regex"),
        (GrammarSpec("grammar", "root ::= undefined_rule", "structured_outputs.grammar"), "undefined_rule"),
    ],
)
def test_a_grammar_that_does_not_compile_names_the_problem(compiler, spec, problem):
    with pytest.raises(FerrumError) as e:
        compiler.compile(spec)
    assert e.value.param == spec.param and problem in str(e.value).lower()


def test_compiles_once_per_distinct_spec(ex):
    compiler = GrammarCompiler(grammar_tokenizer(TOK, ex.cfg.vocab_size))
    for _ in range(3):
        for spec in specs():
            compiler.compile(spec)
    assert compiler.num_compiled == 3
