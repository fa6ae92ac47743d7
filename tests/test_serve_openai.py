"""The OpenAI-compatible routes against a live server, with the official `openai` client:
completions and chat (streaming and not), usage equal to the tokenizer's counts, greedy
output equal to the executor's own greedy decode, seeded sampling reproducible beside
other traffic, n, logprobs in both formats, stop strings and stop token ids, echo,
/v1/models, /tokenize, /detokenize."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest

from serve_fixtures import MAX_MODEL_LEN, MODEL, byte_tokenizer, random_prompt, reference_greedy, shared_server

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is JAX?"}]


@pytest.fixture(scope="session")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.get("/health").status_code == 200
    assert server.get("/version").json()["version"]


def test_completion_usage_equals_tokenizer_counts(server, client):
    prompt = "Hello, world! "
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    tok = byte_tokenizer()
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) == server.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert r.usage.completion_tokens == 7 == len(r.choices[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(r.choices[0].token_ids)
    assert r.choices[0].prompt_token_ids == tok.encode(prompt)


def test_completion_stream_equals_whole(client):
    kw = dict(model=MODEL, prompt="Streaming test", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_usage_ends_with_done(server):
    body = {"prompt": "abc", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])
    assert '"usage"' not in "".join(events)


def test_chat_whole_and_streamed(server, client):
    tok = byte_tokenizer()
    prompt_ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    kw = dict(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt_ids) == server.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_chat_default_max_tokens_fills_the_context(client):
    # No max_tokens: generate up to the context limit, as vLLM does.
    r = client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == MAX_MODEL_LEN and r.choices[0].finish_reason == "length"


def test_greedy_equals_executor_greedy(server):
    """Concurrent greedy requests (so they share batches) against the executor's own
    prefill/decode argmax, token for token. Prompts longer than a step's 32-token budget
    exercise chunked prefill."""
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, n) for n in (1, 5, 31, 33, 70, 120)]
    steps = 24

    async def run():
        client = server.async_client()
        return await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=steps, **GREEDY) for p in prompts))

    replies = asyncio.run(run())
    for p, r in zip(prompts, replies):
        assert r.choices[0].token_ids == reference_greedy(p, steps), f"prompt of {len(p)} tokens"


def test_seed_reproduces_sampling_beside_other_traffic(server):
    sampled = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95, extra_body={"return_token_ids": True, "ignore_eos": True})

    async def run(with_traffic: bool, seed: int):
        client = server.async_client()
        others = [
            client.completions.create(model=MODEL, prompt=f"other {i}", max_tokens=16 + 7 * i, temperature=1.0, extra_body={"ignore_eos": True})
            for i in range(6 if with_traffic else 0)
        ]
        results = await asyncio.gather(client.completions.create(**sampled, seed=seed), *others)
        return results[0].choices[0].token_ids

    alone = asyncio.run(run(False, 1234))
    assert asyncio.run(run(True, 1234)) == alone
    assert asyncio.run(run(True, 4321)) != alone


def test_n_choices(client):
    r = client.completions.create(model=MODEL, prompt=["first", "second"], n=3, max_tokens=5, seed=7, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == list(range(6))
    assert all(len(c.token_ids) == 5 for c in r.choices)
    tok = byte_tokenizer()
    assert r.usage.prompt_tokens == len(tok.encode("first")) + len(tok.encode("second"))
    assert r.usage.completion_tokens == 30
    # Each choice of a seeded request gets its own seed, so the three differ.
    assert len({tuple(c.token_ids) for c in r.choices[:3]}) > 1

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_completion_logprobs(client):
    kw = dict(model=MODEL, prompt="logprobs", max_tokens=6, logprobs=3, temperature=0)
    r = client.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    tok = byte_tokenizer()
    for token_id, token, value, top in zip(r.choices[0].token_ids, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token == (tok.decode([token_id], skip_special_tokens=False) or tok.id_to_token(token_id))
        assert value <= 0 and 1 <= len(top) <= 4 and math.isclose(top[token], value, abs_tol=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    # As token ids, no two tokens share a name: exactly the 3 alternatives, the greedy one first.
    by_id = client.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True})
    lp = by_id.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in by_id.choices[0].token_ids]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and next(iter(top)) == token
        assert math.isclose(value, max(top.values()), rel_tol=1e-5, abs_tol=1e-5)

    echoed = client.completions.create(model=MODEL, prompt="echo me", max_tokens=3, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("echo me")


def test_chat_logprobs(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, rel_tol=1e-5, abs_tol=1e-5)
    streamed = [e for c in client.chat.completions.create(**kw, stream=True) if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def _stop_string(text: str, min_at: int) -> tuple[str, int]:
    """A two-character substring of `text` (no U+FFFD) that first occurs at or after `min_at`."""
    for at in range(min_at, len(text) - 2):
        s = text[at : at + 2]
        if "\ufffd" not in s and text.find(s) == at:
            return s, at
    pytest.skip("the greedy text has no usable stop string")


def test_stop_strings_are_not_leaked(client):
    kw = dict(model=MODEL, prompt="The stop test:", temperature=0, max_tokens=60)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    stop, at = _stop_string(full, 10)
    r = client.completions.create(**kw, stop=[stop, "never appears"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:at]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    assert r.usage.completion_tokens < 60  # the engine request was cut short, not run to max_tokens

    streamed = list(client.completions.create(**kw, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == full[:at]
    assert streamed[-1].choices[0].finish_reason == "stop"

    kept = client.completions.create(**kw, stop=[stop], extra_body={"include_stop_str_in_output": True, "ignore_eos": True})
    assert kept.choices[0].text == full[: at + len(stop)]

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=60, extra_body={"ignore_eos": True})
    chat_full = chat.choices[0].message.content
    stop, at = _stop_string(chat_full, 5)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=60, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_full[:at]


def test_stop_token_ids_and_min_tokens(client):
    tokens = client.completions.create(model=MODEL, prompt="stop ids", max_tokens=20, **GREEDY).choices[0].token_ids
    stop_id = tokens[8]
    first = tokens.index(stop_id)
    r = client.completions.create(model=MODEL, prompt="stop ids", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [stop_id], "return_token_ids": True, "ignore_eos": True})
    assert r.choices[0].token_ids == tokens[: first + 1]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop_id
    # min_tokens bans the stop token until that many tokens exist.
    r = client.completions.create(
        model=MODEL, prompt="stop ids", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [stop_id], "min_tokens": first + 2, "return_token_ids": True, "ignore_eos": True}
    )
    out = r.choices[0].token_ids
    assert len(out) >= first + 2 and stop_id not in out[: first + 1]


def test_all_sampling_parameters_are_accepted(client):
    r = client.completions.create(
        model=MODEL,
        prompt="knobs",
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True, "return_token_ids": True},
    )
    assert len(r.choices[0].token_ids) == 9


def test_tokenize_detokenize(server):
    tok = byte_tokenizer()
    r = server.post("/tokenize", json={"prompt": "héllo", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("héllo") and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert server.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()["tokens"] == list(b"hi")
    assert server.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    chat = server.post("/tokenize", json={"messages": CHAT, "model": MODEL}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
