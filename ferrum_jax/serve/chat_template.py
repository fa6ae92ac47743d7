"""Chat templates: turning OpenAI-style messages into a prompt string, the way transformers does.

A model's chat template is Jinja code from its `tokenizer_config.json` (or `chat_template.jinja`).
The prompt the model was trained on is whatever transformers' `apply_chat_template(...,
tokenize=False)` renders, so this module reproduces that renderer exactly rather than
approximating it: an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with
the `loopcontrols` extension, a no-op `{% generation %}` tag (transformers uses it to mark
assistant tokens; templates that contain it must still compile), transformers' `tojson` filter
(no HTML escaping, `ensure_ascii=False`, `indent`/`separators`/`sort_keys` options), and the
globals `raise_exception`, `strftime_now`, `dict` and an underscore-refusing `namespace`.

Before rendering, messages are normalised the way an OpenAI-compatible server must, since the
templates were written for transformers' inputs and not for the OpenAI wire format:

- keys whose value is `None` are dropped (clients send `"content": null` beside `tool_calls`,
  and templates test for a key's presence, not for null), as transformers does;
- `content` given as a list of `{"type": "text", "text": ...}` parts is joined with newlines into
  one string (vLLM's "string" content format); any other part type is rejected, since the models
  served here read text only;
- `tool_calls[*].function.arguments` sent as a JSON string (the OpenAI form) is parsed into an
  object, because tool-use templates render it with `tojson` and expect a dict (what vLLM does);
- a message's reasoning given as `reasoning`, `thinking` or `reasoning_content` is visible under
  all of `reasoning_content` and `thinking`, as in transformers 5.

A template's `raise_exception(msg)` becomes `FerrumError.invalid_request(msg)`: templates raise
it to reject a conversation (a bad role order, a missing system prompt), so it is the client's
error. Any other failure while rendering is reported the same way, since a template's code can
only fail on the data it was given; a template that does not compile is `invalid_config`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ferrum_jax.interfaces.errors import FerrumError

# The names a message's reasoning travels under; the first is the one templates usually read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    raise FerrumError.invalid_request(str(message), param="messages")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict` without the class object itself, so a template cannot reach `dict.__subclasses__` and the like.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Jinja's namespace lets a template store `__class__`-style attributes; refusing underscore names
    # closes that route out of the sandbox (transformers does the same).
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to compute an assistant-token mask for training; serving only
    needs the text, but must accept templates that use it.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Cached because a server renders the same one or two templates for every request.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise FerrumError.invalid_config(f"chat template does not compile: {e.message} (line {e.lineno})") from e


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of JSON types only.

    The template sees nothing else (the sandbox cannot vouch for arbitrary objects' methods), and
    the copy means normalisation never edits the caller's messages.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str/int enums, numpy floats) carry extra methods; keep only the base value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if callable(getattr(value, "model_dump", None)):
        # Pydantic request models, such as the OpenAI SDK's message types.
        return _plain(value.model_dump(), where)
    raise FerrumError.invalid_request(
        f"{where} holds a value of type {type(value).__name__}; only JSON values are allowed", param=where
    )


def _flatten_content(content: Any, index: int) -> Any:
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FerrumError.invalid_request(
                f"messages[{index}].content: unsupported content part {kind!r}; this model accepts text parts only",
                param="messages",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _parse_tool_call_arguments(tool_calls: Any, index: int) -> None:
    if not isinstance(tool_calls, list):
        return
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError as e:
                raise FerrumError.invalid_request(
                    f"messages[{index}].tool_calls: function.arguments is not valid JSON ({e.msg})", param="messages"
                ) from e


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the template should see them (see the module docstring); a fresh copy."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise FerrumError.invalid_request("messages must be a non-empty list of message objects", param="messages")
    out = []
    for i, raw in enumerate(_plain(list(messages), "messages")):
        if not isinstance(raw, dict):
            raise FerrumError.invalid_request(f"messages[{i}] must be an object with a role", param="messages")
        message = {k: v for k, v in raw.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise FerrumError.invalid_request(f"messages[{i}].role must be a string", param="messages")
        if "content" in message:
            message["content"] = _flatten_content(message["content"], i)
        _parse_tool_call_arguments(message.get("tool_calls"), i)
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """One compiled chat template. `render` is what `apply_chat_template(..., tokenize=False)` returns."""

    def __init__(self, source: str):
        if not isinstance(source, str) or not source:
            raise FerrumError.invalid_config("a chat template must be a non-empty string")
        self.source = source
        self._template = _compile(source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages`. `special_tokens` ({"bos_token": "<s>", ...}) are template variables that
        `kwargs` may override, the precedence transformers uses; `documents` is passed as None unless
        given, because transformers always defines it."""
        variables = {"documents": None, **(special_tokens or {}), **_plain(kwargs, "chat_template_kwargs")}
        try:
            return self._template.render(
                messages=normalize_messages(messages),
                tools=None if tools is None else _plain(list(tools), "tools"),
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
        except FerrumError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise FerrumError.invalid_request(f"chat template failed on these messages: {e}", param="messages") from e
