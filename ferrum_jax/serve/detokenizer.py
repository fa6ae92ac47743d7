"""Streaming detokenization: turning generated ids into text deltas as they arrive.

Decoding each new token on its own is wrong twice over. A token can hold part of a UTF-8
character (byte-level BPE and SentencePiece byte fallback split emoji and CJK across tokens), so
its text alone is U+FFFD; and a token's text depends on its neighbours (SentencePiece decoders
drop the leading space of the first token of a decode call, so "▁world" alone is "world").

`IncrementalDetokenizer` uses the prefix-offset / read-offset technique of TGI and vLLM: it keeps
two offsets into the ids, `read_offset` (everything before it has been emitted) and
`prefix_offset` (a few tokens of already-emitted context before that). Each step decodes the
window `ids[prefix_offset:]` and the context `ids[prefix_offset:read_offset]`; the new text is
the part of the window's text past the context's. Because both decodes start at the same token,
whatever a decoder does to the first token of a call cancels out, and the context gives the first
new token its correct spacing. While the window's text ends in U+FFFD the tail is an incomplete
character, so nothing is emitted and the offsets stay put; the next token completes it. When text
is emitted the window slides: the emitted tokens become the next context. A stream starts with
up to `PROMPT_CONTEXT_TOKENS` prompt tokens as context, so the first generated token is spaced as
it is in the full text.

The concatenated deltas of a stream, plus `flush()`, equal `decode(prompt_ids + ids)` minus
`decode(prompt_ids)` (with no prompt: `decode(ids)`), and no delta ends inside a character;
`flush()` returns what is still held back at the end (a character the output never completed,
which then decodes as U+FFFD). The one exception is output that is not valid UTF-8 under a
byte-fallback tokenizer, whose full decode also blanks the valid characters next to the invalid
bytes; the stream keeps the characters it already emitted and gives U+FFFD for the bad bytes.

Ids outside the tokenizer's vocabulary produce no text: a model's embedding table is often padded
past the tokenizer's ids, and a sampled padding id must not break the stream it appears in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ferrum_jax.serve.tokenizer import Tokenizer

# How many prompt tokens of context the first window starts with (vLLM uses the same number);
# enough for any decoder's dependence on the preceding token, few enough to keep decodes cheap.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one generated sequence; `step` per batch of new ids, `flush` once at the end."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._add(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def step(self, new_ids: Iterable[int]) -> str:
        """Add generated ids; return the text they complete (possibly "")."""
        self._add(new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """End the stream: return the held-back text, incomplete characters included."""
        return self._emit(final=True)

    def _add(self, ids: Iterable[int]) -> None:
        vocab_size = self._tokenizer.vocab_size
        self._ids.extend(i for i in map(int, ids) if 0 <= i < vocab_size)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        context = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        window = decode(self._ids[self._prefix_offset :], self._skip_special_tokens)
        # A window no longer than its context added no text yet (e.g. only skipped special tokens).
        if len(window) <= len(context) or (window.endswith(_REPLACEMENT) and not final):
            return ""
        if window.startswith(context):
            delta = window[len(context) :]
        else:
            # Only invalid UTF-8 gets here: `tokenizers`' ByteFallback decoder turns a whole run of byte
            # tokens into U+FFFD once the run holds an invalid sequence, so already-emitted characters
            # "change" retroactively. Emit the held tokens on their own rather than a misaligned diff.
            delta = decode(self._ids[self._read_offset :], self._skip_special_tokens)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta
