"""Tool-call parsing and tool_choice planning on hand-written replies (no server): what each
parser extracts, what it leaves as content, what a stream may send before the reply ends,
and the 400s a request gets for tool settings the server cannot honour."""

from __future__ import annotations

import json

import pytest

from ferrum_jax.serve.errors import APIError
from ferrum_jax.serve.tool_calls import plan_tools
from ferrum_jax.serve.tool_parsers import HermesParser, Llama3JsonParser, ParsedCall

TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "g"}},
]


def test_hermes_calls_and_content():
    p = HermesParser()
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = p.parse(text)
    assert content == "Let me check."
    assert calls == [ParsedCall("f", '{"x": 1}'), ParsedCall("g", "{}")]
    assert p.parse("no calls here") == ("no calls here", [])
    # Broken JSON: the reply stays plain content, as vLLM's parser leaves it.
    broken = '<tool_call>{"name": "f", "arguments": </tool_call>'
    assert p.parse(broken) == (broken, [])
    # An unterminated last call (max_tokens hit right after the JSON) still parses.
    assert p.parse('<tool_call>{"name": "g", "arguments": {"y": "z"}}')[1] == [ParsedCall("g", '{"y": "z"}')]


def test_hermes_streams_content_up_to_a_possible_call():
    p = HermesParser()
    assert p.safe_content_len("Hello") == 5
    assert p.safe_content_len("Hello <tool") == len("Hello ")
    assert p.safe_content_len("Hello <tool_call>{") == len("Hello ")
    assert p.safe_content_len("a < b") == 5


def test_llama3_json_calls():
    p = Llama3JsonParser()
    assert p.parse('{"name": "f", "parameters": {"x": 2}}') == (None, [ParsedCall("f", '{"x": 2}')])
    two = '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}'
    assert p.parse(two)[1] == [ParsedCall("f", '{"x": 1}'), ParsedCall("g", "{}")]
    assert p.parse("The answer is 4.") == ("The answer is 4.", [])
    assert p.parse('{"not": "a call"}') == ('{"not": "a call"}', [])
    assert p.safe_content_len("  {") == 0 and p.safe_content_len("<|python") == 0
    assert p.safe_content_len("Sure") == 4


def test_plans_and_their_grammars():
    assert plan_tools(None, None, None, False, None).mode == "none"
    assert plan_tools(TOOLS, "none", None, False, None).mode == "none"
    auto = plan_tools(TOOLS, None, False, True, "hermes")
    assert (auto.mode, auto.parallel, auto.parser) == ("auto", False, "hermes")
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "g"}}, None, False, None)
    assert named.mode == "named" and json.loads(named.grammar(TOOLS).source) == {"properties": {}, "type": "object"}
    content, calls = named.tool_calls('{"a": 1}')
    assert content is None and calls[0].function.name == "g" and json.loads(calls[0].function.arguments) == {"a": 1}
    required = plan_tools(TOOLS, "required", False, False, None)
    schema = json.loads(required.grammar(TOOLS).source)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["f"], ["g"]]
    _, calls = required.tool_calls('[{"name": "f", "parameters": {"x": 3}}]')
    assert [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"x": 3}')]
    assert calls[0].id.startswith("chatcmpl-tool-")


@pytest.mark.parametrize(
    "tools, choice, auto, parser, fragment",
    [
        (TOOLS, "auto", False, None, "--enable-auto-tool-choice"),
        (TOOLS, None, False, None, "--tool-call-parser"),
        (TOOLS, {"type": "function", "function": {"name": "h"}}, True, "hermes", "'h'"),
        (None, "required", True, "hermes", "needs tools"),
        (TOOLS, "sometimes", True, "hermes", "sometimes"),
        ([{"type": "function"}], "required", True, "hermes", "tools[0]"),
    ],
)
def test_plans_refused(tools, choice, auto, parser, fragment):
    with pytest.raises(APIError) as e:
        plan_tools(tools, choice, None, auto, parser)
    assert e.value.status == 400 and fragment in e.value.message
