"""Grammars for constrained decoding: what a request asks for, compiled once per distinct text.

The engine is llguidance (vLLM's `guidance` backend) rather than xgrammar: its wheel has no
dependencies, where xgrammar's pulls torch, transformers and triton into a JAX server; it
builds a token mask lazily from an Earley parser over the tokenizer's trie, so there is no
per-schema ahead-of-time compile to wait for (a typical JSON schema is ready in ~1 ms, its
masks take tens to hundreds of microseconds per token); and it reads JSON schema, regular
expressions, Lark and llama.cpp's GBNF (the EBNF dialect vLLM's `grammar` field takes) from one
API. Its numpy bitmask layout (`[rows, ceil(vocab / 32)]` int32, bit t % 32 of word t // 32) is
the one the device sampler unpacks (`ferrum_jax.step.sampling.apply_bitmask`).

JSON is compiled with fixed separators (", " and ": ") and no free whitespace: free whitespace
lets a small model pad forever between tokens and never close the object.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import Literal

import llguidance

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.structured.matcher import RequestGrammar

GrammarKind = Literal["json", "regex", "choice", "grammar"]

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any JSON object: `response_format: {"type": "json_object"}`.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What one request constrains its output to. source: a JSON schema (serialized), a regex,
    a JSON list of choices, or an EBNF/GBNF or Lark grammar; param: the request field it came
    from, for error messages."""

    kind: GrammarKind
    source: str
    param: str

    def cache_key(self) -> tuple[str, str]:
        return self.kind, self.source


def _grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for `spec`; a ValueError names what is wrong with it."""
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return llguidance.grammar_from("grammar", spec.source)


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer, caching the result per distinct spec.

    A compiled grammar is a matcher in its start state; each request gets a `deep_copy` of it,
    which skips rebuilding the parser. `compile` blocks (grammar construction can take
    ~100 ms for a large schema): the server calls it in a worker thread.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, cache_size: int = 256):
        self.tokenizer = tokenizer
        self._cache: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def compile(self, spec: GrammarSpec) -> RequestGrammar:
        """A fresh matcher for one request; FerrumError (invalid_request, naming the problem
        and `spec.param`) if the grammar does not compile."""
        key = spec.cache_key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            template = self._build(spec)
            with self._lock:
                self._cache[key] = template
                self.num_compiled += 1
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return RequestGrammar(template.deep_copy())

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        def bad(problem: str) -> FerrumError:
            return FerrumError.invalid_request(f"the {spec.kind} constraint does not compile: {problem}", param=spec.param)

        try:
            grammar = _grammar_text(spec)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise bad(str(e)) from e
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise bad(error)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise bad(matcher.get_error())
        return matcher
