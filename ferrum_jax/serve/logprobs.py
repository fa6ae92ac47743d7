"""Engine `TokenLogprob`s in OpenAI's two wire formats.

/v1/completions (legacy format): parallel lists `tokens`, `token_logprobs`, `top_logprobs`
(one `{token: logprob}` dict per position, holding the `logprobs` most likely tokens and,
as in OpenAI and vLLM, the sampled one) and `text_offset` (where each token's text starts
in the returned text, echoed prompt included).

/v1/chat/completions: `content` = one `{token, logprob, bytes, top_logprobs: [...]}` per
token, where `top_logprobs` holds exactly `top_logprobs` alternatives.

A token is shown as its own decoded text (`decode([id])`, special tokens spelled out), the
way OpenAI shows tokens; a token with no text of its own (a reserved id) shows as its
vocabulary entry; a byte-level piece that is not valid UTF-8 on its own shows as U+FFFD,
and `bytes` is that string's UTF-8 (what vLLM returns too). Because different tokens can
show the same (U+FFFD), the legacy format's dicts may hold fewer entries than asked for;
`return_tokens_as_token_ids` (vLLM's option) shows every token as "token_id:<id>" instead,
which is unambiguous. A logprob of -inf
(a token a sampling filter removed) is sent as -9999.0, as vLLM does, because JSON has no
infinity.
"""

from __future__ import annotations

import functools

from ferrum_jax.engine import TokenLogprob
from ferrum_jax.serve.output import ChoiceDelta
from ferrum_jax.serve.protocol import ChatChoiceLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob
from ferrum_jax.serve.tokenizer import Tokenizer


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)


class TokenText:
    """id -> displayed token string, cached (every streamed token needs one)."""

    def __init__(self, tokenizer: Tokenizer):
        def text(token_id: int) -> str:
            # A model's embedding can be wider than its tokenizer (padded rows, or a preset
            # served with the byte tokenizer): such sampled ids have no text of their own.
            if not 0 <= token_id < tokenizer.vocab_size:
                return f"<|id_{token_id}|>"
            return tokenizer.decode([token_id], skip_special_tokens=False) or tokenizer.id_to_token(token_id) or ""

        self._text = functools.lru_cache(maxsize=65536)(text)

    def __call__(self, token_id: int, as_id: bool = False) -> str:
        return f"token_id:{token_id}" if as_id else self._text(token_id)


def completion_logprobs(
    delta: ChoiceDelta, token_text: TokenText, offset: int, as_ids: bool = False, into: CompletionLogprobs | None = None
) -> CompletionLogprobs:
    """Appends `delta`'s tokens to `into` (a fresh object when None); `offset` is added to
    each text offset (the length of an echoed prompt)."""
    out = into if into is not None else CompletionLogprobs()
    for lp, at in zip(delta.logprobs, delta.text_offsets):
        token = token_text(lp.token_id, as_ids)
        top = {}
        for tid, value in lp.top:
            top.setdefault(token_text(tid, as_ids), _finite(value))
        top.setdefault(token, _finite(lp.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(at + offset)
    return out


def _entry(token_id: int, logprob: float, token_text: TokenText, as_ids: bool) -> dict:
    token = token_text(token_id, as_ids)
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    logprobs: list[TokenLogprob], token_text: TokenText, as_ids: bool = False, into: ChatChoiceLogprobs | None = None
) -> ChatChoiceLogprobs:
    out = into if into is not None else ChatChoiceLogprobs(content=[])
    for lp in logprobs:
        top = [TopLogprob(**_entry(tid, value, token_text, as_ids)) for tid, value in lp.top]
        out.content.append(TokenLogprobEntry(**_entry(lp.token_id, lp.logprob, token_text, as_ids), top_logprobs=top))
    return out
