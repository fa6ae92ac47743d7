"""Bad input against a live server: every case gets its HTTP status and an OpenAI error
object `{"error": {"message", "type", "param", "code"}}` naming the offending field, never
a 500, and the server keeps serving afterwards."""

from __future__ import annotations

import openai
import pytest

from serve_fixtures import MAX_MODEL_LEN, MODEL, shared_server

CHAT = [{"role": "user", "content": "hi"}]
LONG = "x" * (MAX_MODEL_LEN + 10)


@pytest.fixture(scope="session")
def server():
    return shared_server()


def completion(**kw):
    return ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4, **kw})


def chat(**kw):
    return ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4, **kw})


# (case, (path, json body), status, param). vLLM's ranges for the sampling parameters.
CASES = [
    ("temperature<0", completion(temperature=-0.1), 400, "temperature"),
    ("top_p=0", completion(top_p=0), 400, "top_p"),
    ("top_p>1", chat(top_p=1.5), 400, "top_p"),
    ("top_k<-1", completion(top_k=-2), 400, "top_k"),
    ("min_p>1", completion(min_p=1.5), 400, "min_p"),
    ("presence>2", completion(presence_penalty=2.5), 400, "presence_penalty"),
    ("frequency<-2", chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition=0", completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("max_tokens=0", completion(max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens=0", chat(max_tokens=None, max_completion_tokens=0), 400, "max_completion_tokens"),
    ("min_tokens>max_tokens", completion(min_tokens=10), 400, "min_tokens"),
    ("n=0", completion(n=0), 400, "n"),
    ("n too large", completion(n=1000), 400, "n"),
    ("logprobs>20", completion(logprobs=21), 400, "logprobs"),
    ("top_logprobs>20", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    ("temperature is a string", completion(temperature="hot"), 400, "temperature"),
    ("prompt missing", ("/v1/completions", {"model": MODEL}), 400, "prompt"),
    ("messages not a list", chat(messages="hi"), 400, "messages"),
    ("message without role", chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("mixed prompt list", completion(prompt=[1, "a"]), 400, "prompt"),
    ("empty messages", chat(messages=[]), 400, "messages"),
    ("unknown role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("image content", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    ("empty prompt", completion(prompt=[]), 400, "prompt"),
    ("token id out of vocab", completion(prompt=[1, 2, 99999]), 400, "prompt"),
    ("negative token id", completion(prompt=[-1]), 400, "prompt"),
    ("prompt over context", completion(prompt=LONG), 400, "prompt"),
    ("chat over context", chat(messages=[{"role": "user", "content": LONG}], max_tokens=None), 400, "messages"),
    ("logit_bias", completion(logit_bias={"5": 1.0}), 400, "logit_bias"),
    ("suffix", completion(suffix="end"), 400, "suffix"),
    ("echo with logprobs", completion(echo=True, logprobs=1), 400, "echo"),
    ("stream_options without stream", completion(stream_options={"include_usage": True}), 400, "stream_options"),
    ("tool_choice required", chat(tool_choice="required"), 400, "tool_choice"),
    ("unknown response_format", chat(response_format={"type": "yaml"}), 400, "response_format.type"),
    ("invalid json schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wibble"}}}), 400, "response_format.json_schema.schema"),
    ("two structured_outputs", completion(structured_outputs={"regex": "a", "choice": ["b"]}), 400, "structured_outputs"),
    ("unknown model", completion(model="gpt-17"), 404, "model"),
    ("unknown model, chat", chat(model="gpt-17"), 404, "model"),
    ("detokenize out of vocab", ("/detokenize", {"tokens": [1, 100000]}), 400, "tokens"),
    ("tokenize neither form", ("/tokenize", {}), 400, "prompt"),
]


@pytest.mark.parametrize("path_body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clean_error(server, path_body, status, param):
    path, body = path_body
    r = server.post(path, json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"


def test_context_length_wording(server):
    path, body = completion(prompt="x" * 200, max_tokens=100)
    r = server.post(path, json=body)
    prompt_len = 201  # bos + 200 bytes
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{prompt_len + 100} tokens ({prompt_len} in the messages, 100 in the completion). "
        "Please reduce the length of the messages or completion."
    )
    # The openai client surfaces it as BadRequestError, like OpenAI's own.
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}])


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "hi", ', b"not json at all", b'["a", "list"]', b""],
    ids=["truncated", "garbage", "not an object", "empty"],
)
def test_malformed_body_is_400(server, content):
    r = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(server):
    r = server.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = server.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_server_keeps_serving_after_bad_input(server):
    for path, body in (completion(temperature=-1), chat(messages=[]), completion(prompt=[99999])):
        server.post(path, json=body)
    r = server.client().completions.create(model=MODEL, prompt="still alive", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert server.get("/health").status_code == 200
