"""What every route shares: the engine, the tokenizer, the served names, and the request
checks both generation endpoints make in the same way (model name, context length,
sampling parameters, the fields this server does not implement)."""

from __future__ import annotations

import dataclasses
import uuid

from ferrum_jax.engine import Engine, SamplingParams
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.errors import APIError
from ferrum_jax.serve.logprobs import TokenText
from ferrum_jax.serve.metrics import ServerMetrics
from ferrum_jax.serve.output import ChoiceOutput
from ferrum_jax.serve.protocol import SamplingFields
from ferrum_jax.serve.structured_outputs import StructuredOutputs
from ferrum_jax.serve.tokenizer import Tokenizer

# Sampling fields passed to SamplingParams when the client set them (None: the engine default).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos")


@dataclasses.dataclass
class ServerContext:
    engine: Engine
    tokenizer: Tokenizer
    model_names: tuple[str, ...]
    model_root: str  # what --model pointed at (shown by /v1/models)
    max_model_len: int
    max_waiting: int
    metrics: ServerMetrics
    api_key: str | None = None
    # tool_choice "auto": the parser reading tool calls out of replies (None: auto is refused).
    tool_call_parser: str | None = None
    draining: bool = False
    token_text: TokenText = dataclasses.field(init=False)
    structured: StructuredOutputs = dataclasses.field(init=False)

    def __post_init__(self):
        self.token_text = TokenText(self.tokenizer)
        self.structured = StructuredOutputs(self.tokenizer, self.engine.executor.cfg.vocab_size)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> str:
        """The name to report for a request naming `model` (None: the default model)."""
        if model is None:
            return self.model_name
        if model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model

    def check_context(self, prompt_len: int, max_tokens: int | None, field: str) -> None:
        """vLLM's two context-length errors, word for word (clients match on them)."""
        limit = self.max_model_len
        if max_tokens is None and prompt_len >= limit:
            raise APIError.bad_request(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                param=field,
                code="context_length_exceeded",
            )
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise APIError.bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param=field,
                code="context_length_exceeded",
            )

    def check_choices(self, n: int, num_prompts: int) -> None:
        if n < 1:
            raise APIError.bad_request(f"n={n} must be at least 1", param="n")
        if n * num_prompts > self.max_waiting:
            raise APIError.bad_request(
                f"{num_prompts} prompt(s) x n={n} = {n * num_prompts} sequences exceed the server's queue "
                f"(max_waiting={self.max_waiting})",
                param="n",
            )

    def choice_output(self, body: SamplingFields, prompt_ids: list[int]) -> ChoiceOutput:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        return ChoiceOutput(
            self.tokenizer,
            prompt_ids,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            include_stop_str_in_output=body.include_stop_str_in_output,
            min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens,
        )


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_common(body: SamplingFields) -> None:
    """Fields that are accepted by OpenAI but that this server does not implement are
    refused rather than silently ignored."""
    if body.logit_bias:
        raise APIError.bad_request("logit_bias is not supported", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError.bad_request("stream_options can only be given when stream is true", param="stream_options")


def sampling_params(body: SamplingFields, *, max_tokens: int, logprobs: int | None, seed: int | None, renames: dict[str, str]) -> SamplingParams:
    """The engine's parameters for one choice; an out-of-range value is a 400 naming the
    request field (`renames` maps the engine's name to this endpoint's, e.g. max_tokens
    -> max_completion_tokens)."""
    kwargs = {k: getattr(body, k) for k in _SAMPLING_FIELDS if getattr(body, k) is not None}
    try:
        return SamplingParams(
            **kwargs,
            max_tokens=max_tokens,
            logprobs=logprobs,
            seed=seed,
            stop_token_ids=tuple(body.stop_token_ids or ()),
        )
    except FerrumError as e:
        raise APIError.from_ferrum(e, param=renames.get(e.param, e.param)) from e


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j of a seeded request uses seed + j: reproducible, and the n choices differ."""
    return None if seed is None else seed + j
