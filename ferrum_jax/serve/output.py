"""Turning one engine request's token deltas into the text a client sees.

`ChoiceOutput` owns one choice (one engine request): it detokenizes incrementally (never
emitting half a UTF-8 character), applies `stop` strings, and records what each delta
adds: text, token ids, logprobs, and each token's character offset.

Stop strings are matched here, on text, because they can span token boundaries; the
engine only knows token ids. As in vLLM: the earliest match of any stop string ends the
choice with finish_reason "stop" and `stop_reason` = that string; the text is cut before
it (or after it, with `include_stop_str_in_output`); stop strings are not checked before
`min_tokens` tokens exist. So that a stream never sends text it would have to take back,
the last `len(longest stop) - 1` characters are held back until they can no longer begin
a match. Tokens after a match are dropped; the caller aborts the engine request so its
pages are freed at once instead of after `max_tokens`.
"""

from __future__ import annotations

import dataclasses

from ferrum_jax.engine import RequestOutput, TokenLogprob
from ferrum_jax.serve.detokenizer import IncrementalDetokenizer
from ferrum_jax.serve.tokenizer import Tokenizer


@dataclasses.dataclass
class ChoiceDelta:
    """What one engine delta adds to a choice. `text_offsets[i]` is where token i's text
    starts in the choice's text; `finished` is set exactly once, on the last delta."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text_offsets: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def empty(self) -> bool:
        return not (self.text or self.token_ids or self.finished)


class ChoiceOutput:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        *,
        stop: list[str] = (),
        stop_token_ids: tuple[int, ...] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
    ):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in stop if s]  # "" would match everywhere; OpenAI ignores it
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._stop_token_ids = set(stop_token_ids)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self.text = ""
        self._sent = 0  # characters of self.text already handed out
        self.token_ids: list[int] = []
        self.num_prompt_tokens = len(prompt_ids)
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    def feed(self, out: RequestOutput) -> ChoiceDelta:
        """Applies one engine delta. Deltas after the choice finished are ignored (the
        engine's acknowledgement of an abort after a stop-string match)."""
        delta = ChoiceDelta()
        if self.finished:
            return delta
        self.num_cached_tokens = out.num_cached_tokens
        logprobs = out.new_logprobs or ()
        for i, token in enumerate(out.new_token_ids):
            start = len(self.text)
            self.text += self._detok.step([token])
            self.token_ids.append(token)
            delta.token_ids.append(token)
            delta.text_offsets.append(start)
            if i < len(logprobs):
                delta.logprobs.append(logprobs[i])
            if self._match_stop(start):
                break
        if out.finished and not self.finished:
            start = len(self.text)
            self.text += self._detok.flush()
            if not self._match_stop(start):
                self._finish(out.finish_reason, out.stop_token_id if out.stop_token_id in self._stop_token_ids else None)
        # Until finished, hold back what could still be the start of a stop string.
        end = len(self.text) if self.finished else max(self._sent, len(self.text) - self._hold)
        delta.text = self.text[self._sent : end]
        self._sent = end
        if self.finished:
            delta.finished, delta.finish_reason, delta.stop_reason = True, self.finish_reason, self.stop_reason
        return delta

    def abandon(self) -> None:
        """The client is gone: finished, with nothing more to say."""
        self._finish("abort", None)

    def _match_stop(self, new_from: int) -> bool:
        """Looks for a stop string in text that ends at or after `new_from`; on a match,
        cuts the text and finishes the choice."""
        if not self._stop or self.num_output_tokens < self._min_tokens:
            return False
        window = max(0, new_from - self._hold)
        hits = [(self.text.find(s, window), s) for s in self._stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return False
        at, s = min(hits)
        self.text = self.text[: at + len(s) if self._include_stop else at]
        self._finish("stop", s)
        return True

    def _finish(self, reason: str | None, stop_reason: int | str | None) -> None:
        self.finished = True
        self.finish_reason = reason
        self.stop_reason = stop_reason
