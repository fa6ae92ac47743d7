"""The request fields that constrain a reply (`response_format`, vLLM's `structured_outputs`),
turned into a grammar the engine enforces token by token.

OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any
JSON object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. vLLM's
`structured_outputs`: exactly one of `json` (a schema, object or string), `json_object: true`,
`regex`, `choice` (a list of strings) and `grammar` (EBNF in llama.cpp's GBNF dialect, or Lark).
A request gives at most one of the two fields.

Grammars compile in a worker thread (never on the event loop), once per distinct text: the
`GrammarCompiler` caches them. Its tokenizer view is built on the first constrained request
(~0.3 s for a 49k vocabulary), not at start-up.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import llguidance

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.byte_tokenizer import ByteTokenizer
from ferrum_jax.serve.errors import APIError
from ferrum_jax.serve.tokenizer import HFTokenizer, Tokenizer
from ferrum_jax.structured.compiler import JSON_OBJECT_SCHEMA, GrammarCompiler, GrammarSpec
from ferrum_jax.structured.matcher import RequestGrammar

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class _ByteVocabulary:
    """What llguidance's TokenizerWrapper reads of a tokenizer: each id's bytes."""

    def __init__(self, tok: ByteTokenizer):
        self.eos_token_id = tok.eos_token_ids[0]
        self.bos_token_id = tok.bos_token_id
        specials = range(256, tok.vocab_size)
        self.tokens = [bytes([i]) for i in range(256)] + [(tok.id_to_token(i) or "").encode() for i in specials]
        self.special_token_ids = list(specials)

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the server's tokenizer over the model's `vocab_size` logits (ids
    past the tokenizer's own vocabulary are never allowed)."""
    eos = list(tokenizer.eos_token_ids)
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    if isinstance(tokenizer, ByteTokenizer):
        wrapped = llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer))
        return llguidance.LLTokenizer(wrapped, n_vocab=vocab_size, eos_token=eos)
    raise FerrumError.unsupported(f"structured outputs need a HF or byte tokenizer, not {type(tokenizer).__name__}")


class StructuredOutputs:
    """The server's grammar compiler, built on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(grammar_tokenizer(self._tokenizer, self._vocab_size))
            return self._compiler

    async def compile(self, spec: GrammarSpec | None) -> RequestGrammar | None:
        """A fresh matcher for one choice (None: unconstrained); a grammar that does not
        compile is a 400 naming the field and the problem."""
        if spec is None:
            return None
        try:
            return await asyncio.to_thread(lambda: self.compiler.compile(spec))
        except FerrumError as e:
            raise APIError.from_ferrum(e, param=spec.param) from e


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise APIError.bad_request(f"{param} is not valid JSON: {e}", param=param) from e
    if not isinstance(schema, (dict, bool)):
        raise APIError.bad_request(f"{param} must be a JSON schema object, got {type(schema).__name__}", param=param)
    return json.dumps(schema, sort_keys=True)


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    return GrammarSpec("json", _schema_text(schema, param), param)


def response_format_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json", JSON_OBJECT_SCHEMA, "response_format")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict) or "schema" not in body:
            raise APIError.bad_request(
                "response_format of type json_schema needs json_schema: {name, schema}", param="response_format.json_schema"
            )
        return json_schema_spec(body["schema"], "response_format.json_schema.schema")
    raise APIError.bad_request(
        f"response_format type {kind!r}: expected 'text', 'json_object' or 'json_schema'", param="response_format.type"
    )


def structured_outputs_spec(fields: dict[str, Any] | None) -> GrammarSpec | None:
    if fields is None:
        return None
    given = {k: v for k, v in fields.items() if k in _STRUCTURED_KINDS and v not in (None, False)}
    unknown = sorted(set(fields) - set(_STRUCTURED_KINDS) - {"disable_any_whitespace", "disable_fallback", "disable_additional_properties", "whitespace_pattern"})
    if unknown:
        raise APIError.bad_request(f"structured_outputs: unknown field(s) {unknown}; expected one of {list(_STRUCTURED_KINDS)}", param="structured_outputs")
    if len(given) != 1:
        raise APIError.bad_request(
            f"structured_outputs needs exactly one of {list(_STRUCTURED_KINDS)}, got {sorted(given) or 'none'}",
            param="structured_outputs",
        )
    (kind, value), = given.items()
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return json_schema_spec(value, param)
    if kind == "json_object":
        return GrammarSpec("json", JSON_OBJECT_SCHEMA, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise APIError.bad_request(f"{param} must be a non-empty list of strings", param=param)
        return GrammarSpec("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise APIError.bad_request(f"{param} must be a non-empty string", param=param)
    return GrammarSpec(kind, value, param)


def request_spec(response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None) -> GrammarSpec | None:
    """The constraint a generation request asks for, None if it asks for none."""
    a, b = response_format_spec(response_format), structured_outputs_spec(structured_outputs)
    if a is not None and b is not None:
        raise APIError.bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
    return a or b
