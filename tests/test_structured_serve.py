"""Structured outputs and tool calling through the official `openai` client against a live
server on the default model (SmolLM2-135M-Instruct): replies validated by `jsonschema`,
`re` and the choice lists, not by the grammar engine that produced them; unconstrained
greedy replies unchanged by constrained neighbours; tool calls parsed into the client's own
types, streamed and not; bad input refused with OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

import ferrum_jax as fj
from serve_fixtures import LiveServer, shared_server

MODEL = fj.DEFAULT_MODEL_NAME
ARGS = [
    "--max-num-seqs", "8", "--max-model-len", "512", "--max-num-batched-tokens", "256", "--no-warmup",
    "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
]  # fmt: skip

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}}, "required": ["items"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "month": {"type": "integer", "minimum": 1, "maximum": 12}}, "required": ["year", "month"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"first": NAME, "last": NAME}, "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["status", "count"]},
    {"type": "object", "properties": {"title": NAME, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["title", "tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    {"type": "object", "properties": {"rows": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["id"]}, "minItems": 1, "maxItems": 2}}, "required": ["rows"]},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go"]}, "stars": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["language", "stars"], "additionalProperties": False},
    {"type": "object", "properties": {"nickname": {"anyOf": [NAME, {"type": "null"}]}}, "required": ["nickname"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 10}, "letters": {"type": "integer", "minimum": 2, "maximum": 10}}, "required": ["word", "letters"]},
]


def strict(schema):
    """OpenAI's strict mode: no properties beyond the listed ones, at every level (without it
    a greedy small model invents keys until max_tokens)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


SCHEMAS = [strict(s) for s in SCHEMAS]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Adds two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["a", "b"]},
        },
    },
]
TOOL_PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server():
    s = LiveServer(ARGS, model=None).wait_ready()
    yield s
    s.stop()


def ask(question: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": question}]


async def _json_reply(client: openai.AsyncOpenAI, schema: dict, i: int, stream: bool) -> tuple[str, str]:
    kw = dict(
        model=MODEL, messages=ask(f"Example {i}: describe something as JSON."), max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
    )
    if not stream:
        r = await client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, reason = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


def test_twenty_json_schemas_streamed_and_not_always_validate(server):
    async def go():
        client = server.async_client()
        jobs = [_json_reply(client, schema, i, stream) for i, schema in enumerate(SCHEMAS) for stream in (False, True)]
        return await asyncio.gather(*jobs)

    replies = asyncio.run(go())
    unfinished = [(SCHEMAS[k // 2], text) for k, (text, reason) in enumerate(replies) if reason != "stop"]
    assert not unfinished
    for k, (text, _) in enumerate(replies):
        jsonschema.validate(json.loads(text), SCHEMAS[k // 2])
    # Greedy: the streamed reply is the same text as the whole one.
    assert [replies[k][0] for k in range(0, 40, 2)] == [replies[k][0] for k in range(1, 40, 2)]


def test_json_object_choice_regex_and_grammar(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=ask("A person."), max_tokens=120, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    choices = ["Paris", "London", "Berlin"]
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("The capital of France?"), max_tokens=10, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"choice": choices}},
        )
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop"
    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}"
    for seed in range(4):
        r = client.completions.create(
            model=MODEL, prompt="Name and number:", max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"regex": pattern}},
        )
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
    grammar = 'root ::= "The answer is " digit digit "."\ndigit ::= [0-9]'
    r = client.completions.create(model=MODEL, prompt="Q: 6 x 7?", max_tokens=16, temperature=0, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]{2}\.", r.choices[0].text)


def test_unconstrained_greedy_replies_do_not_change_beside_constrained_ones(server):
    plain = dict(model=MODEL, messages=ask("Write a short poem about the sea."), max_tokens=40, temperature=0)

    async def go():
        client = server.async_client()
        alone = await client.chat.completions.create(**plain)
        constrained = [
            client.chat.completions.create(
                model=MODEL, messages=ask(f"Thing {i}"), max_tokens=60, temperature=0.8, seed=i,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[i]}},
            )
            for i in range(5)
        ]
        together = await asyncio.gather(client.chat.completions.create(**plain), *constrained)
        return alone, together[0]

    alone, together = asyncio.run(go())
    assert together.choices[0].message.content == alone.choices[0].message.content
    assert not alone.choices[0].message.content.lstrip().startswith("{")


def _streamed_tool_calls(stream) -> tuple[list[ChatCompletionMessageFunctionToolCall], str, str]:
    """Tool calls accumulated from deltas the way OpenAI clients do, then validated into the
    client's own type; (calls, content, finish_reason)."""
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            reason = c.finish_reason or reason
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["function"]["name"] += tc.function.name or ""
                    call["function"]["arguments"] += tc.function.arguments or ""
    return [ChatCompletionMessageFunctionToolCall.model_validate(calls[k]) for k in sorted(calls)], content, reason


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert isinstance(call, ChatCompletionMessageFunctionToolCall) and call.id and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOL_PARAMETERS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_round_trip(server, tool_choice, stream):
    client = server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=120, temperature=0)
    if stream:
        calls, content, reason = _streamed_tool_calls(client.chat.completions.create(stream=True, **kw))
        assert content == ""
    else:
        r = client.chat.completions.create(**kw)
        calls, reason = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert r.choices[0].message.content is None
    _check_calls(calls, {"add"} if isinstance(tool_choice, dict) else set(TOOL_PARAMETERS))
    assert reason == "tool_calls"
    # The round trip: the call and its result go back into the conversation.
    messages += [
        {"role": "assistant", "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": "42"} for c in calls),
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls in (None, []) and r.choices[0].message.content


HERMES_SHOT = [
    {"role": "system", "content": 'You call tools. To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.'},
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>'},
    {"role": "tool", "content": "20 degrees"},
    {"role": "assistant", "content": "It is 20 degrees in Rome."},
    {"role": "user", "content": "Weather in Oslo?"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls(server, stream):
    client = server.client()
    kw = dict(model=MODEL, messages=HERMES_SHOT, tools=TOOLS, max_tokens=60, temperature=0)
    if stream:
        calls, content, reason = _streamed_tool_calls(client.chat.completions.create(stream=True, **kw))
        assert "<tool_call>" not in content
    else:
        r = client.chat.completions.create(**kw)
        calls, reason = r.choices[0].message.tool_calls, r.choices[0].finish_reason
    _check_calls(calls, set(TOOL_PARAMETERS))
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["city"] == "Oslo"
    assert reason == "tool_calls"


def _error(excinfo) -> dict:
    assert excinfo.value.status_code == 400
    body = excinfo.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return body


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ask("x"), max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wibble"}}},
        )
    body = _error(e)
    assert "wibble" in body["message"] and body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("x"), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert _error(e)["param"] == "structured_outputs"


def test_tools_without_a_parser_are_refused():
    client = shared_server().client()  # the suite's tiny server: no --tool-call-parser
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask("x"), tools=TOOLS, max_tokens=5)
    body = _error(e)
    assert "--tool-call-parser" in body["message"] and body["param"] == "tool_choice"
