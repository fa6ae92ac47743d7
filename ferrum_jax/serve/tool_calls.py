"""Tool calling in /v1/chat/completions: what `tools`, `tool_choice` and `parallel_tool_calls`
ask for, and the tool calls read out of a finished reply.

- `none` (the default without tools): plain text; the template still sees the tools.
- `auto` (the default with tools): the model decides; its calls are parsed out of the text by
  the server's `--tool-call-parser` (needs `--enable-auto-tool-choice`, else a 400).
- `required`: the reply is forced, by grammar, to be a JSON array of at least one
  `{"name": <a tool>, "parameters": <its schema>}` (at most one without parallel tool calls).
- a named function `{"type": "function", "function": {"name": N}}`: the reply is forced to be
  the arguments of N, a JSON object following its parameter schema.
The forced forms are vLLM's, so their arguments always parse whatever the model's own format.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from ferrum_jax.serve.errors import APIError
from ferrum_jax.serve.protocol import FunctionCall, ToolCall
from ferrum_jax.serve.structured_outputs import json_schema_spec
from ferrum_jax.serve.tool_parsers import PARSERS, ParsedCall
from ferrum_jax.structured.compiler import GrammarSpec

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameter schema of each tool; a malformed tool is a 400."""
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError.bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}", param=f"tools[{i}]")
        params = fn.get("parameters") or _EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise APIError.bad_request(f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}].function.parameters")
        out[fn["name"]] = params
    return out


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How one request's reply relates to tools. mode: "none" | "auto" | "required" | "named"."""

    mode: str
    function: str | None = None  # the named function
    parallel: bool = True
    parser: str | None = None

    def grammar(self, tools: list[dict[str, Any]]) -> GrammarSpec | None:
        """The constraint that enforces required / named choices."""
        functions = _functions(tools)
        if self.mode == "named":
            return json_schema_spec(functions[self.function], "tool_choice")
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
            }
            for name, params in functions.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return json_schema_spec(schema, "tool_choice")

    def tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; no calls parsed: (text, [])."""
        if self.mode == "named":
            try:
                args = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            return None, [_tool_call(ParsedCall(self.function, json.dumps(args, ensure_ascii=False)))]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            return None, [_tool_call(ParsedCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False))) for i in items]
        if self.mode == "auto":
            content, calls = PARSERS[self.parser]().parse(text)
            if not self.parallel:
                calls = calls[:1]
            return content, [_tool_call(c) for c in calls]
        return text, []

    def safe_content_len(self, text: str) -> int:
        """How much of a partial reply may stream as content now."""
        if self.mode == "auto":
            return PARSERS[self.parser]().safe_content_len(text)
        return 0 if self.mode in ("named", "required") else len(text)


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=f"chatcmpl-tool-{uuid.uuid4().hex}", function=FunctionCall(name=call.name, arguments=call.arguments))


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice, parallel_tool_calls: bool | None,
               enable_auto_tool_choice: bool, parser: str | None) -> ToolPlan:
    """The request's ToolPlan; what it cannot honour is a 400 in OpenAI's error shape."""
    parallel = parallel_tool_calls is not False
    functions = _functions(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise APIError.bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if not tools:
            raise APIError.bad_request(f"tool_choice names function {name!r} but the request has no tools", param="tool_choice")
        if name not in functions:
            raise APIError.bad_request(f"tool_choice names function {name!r}, which is not among the tools {sorted(functions)}", param="tool_choice")
        return ToolPlan("named", function=name, parallel=parallel)
    if tool_choice == "none":
        return ToolPlan("none")
    if tool_choice == "required":
        if not tools:
            raise APIError.bad_request("tool_choice 'required' needs tools", param="tool_choice")
        return ToolPlan("required", parallel=parallel)
    if tool_choice == "auto":
        if not tools:
            return ToolPlan("none")
        if not enable_auto_tool_choice or parser is None:
            raise APIError.bad_request(
                "tool_choice 'auto' (the default when tools are given) needs the server started with "
                "--enable-auto-tool-choice and --tool-call-parser", param="tool_choice",
            )
        return ToolPlan("auto", parallel=parallel, parser=parser)
    raise APIError.bad_request(f"tool_choice {tool_choice!r}: expected 'none', 'auto', 'required' or a named function", param="tool_choice")
