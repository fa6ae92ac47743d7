"""Server settings: vLLM-named command-line flags, optionally preloaded from a YAML file.

    python -m ferrum_jax.serve --max-num-seqs 8 --port 8001
    python -m ferrum_jax.serve --config configs/serve_cpu.yaml --port 8001

A `--config` file holds the same settings as the flags, spelled either way
(`max-num-seqs` or `max_num_seqs`); precedence is built-in default < file < flag, so a
file can be reused with one value changed on the command line. Unknown keys in the file
are an error (a typo must not be silently ignored), and so is a value left in angle
brackets, to be replaced (`model: <path to the HF dir>`): the shipped serving
configs use one for what each user must fill in.

`--model` and `--preset` name the model two ways and exclude each other; one given as a
flag replaces either from the file. Settings that only make sense together (the
speculative-decoding ones) are checked together, whichever source they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import yaml

# vLLM's --dtype spellings, mapped onto the executor's dtype names (None: its default).
_DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32", "float32": "float32"}

SPECULATIVE_METHODS = ("ngram", "draft")
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
QUANTIZATION_METHODS = ("int8", "int4")  # models.quantization.METHODS, without importing jax here
KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # kv.pages.KV_CACHE_DTYPES
# Draft tokens per step when a method is given without --num-speculative-tokens: enough to
# pay off on repetitive text, few enough that a rejection early in the run wastes little.
DEFAULT_SPECULATIVE_TOKENS = 4
# NgramDrafter's own defaults, spelled out so the two flags can be checked against each other.
DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN = 4, 1

_PLACEHOLDER = re.compile(r"<[^<>]*>")


def flag(name: str) -> str:
    """The command-line spelling of a setting (`max_num_seqs` -> `--max-num-seqs`)."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model: str | None = None  # HF model dir, ferrum checkpoint dir, GGUF file, or preset name; None: the default model
    preset: str | None = None  # a model preset of configs/ (excludes model)
    tokenizer: str | None = None  # dir with tokenizer.json, or "byte"; None: the model's own
    served_model_name: tuple[str, ...] = ()  # names clients may use; the first is reported
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    max_waiting: int = 256
    dtype: str = "auto"
    page_size: int | None = None
    num_pages: int | None = None
    attention: str = "auto"
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE stacks split over the devices by expert, not by width
    enable_prefix_caching: bool = True
    quantization: str | None = None  # "int8" | "int4": weight-only quantization on load; None: as stored
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) | "int8" | "fp8" (e4m3 pages), scaled
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse the reply's tool calls
    tool_call_parser: str | None = None  # how tool calls are written: "hermes" | "llama3_json"
    seed: int = 0
    shutdown_timeout: float = 30.0
    no_warmup: bool = False
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    speculative_method: str | None = None  # "ngram" | "draft"; None: no speculative decoding
    num_speculative_tokens: int | None = None  # None: DEFAULT_SPECULATIVE_TOKENS with a method, else off
    speculative_model: str | None = None  # the draft: HF dir, ferrum checkpoint, or preset:NAME[:SEED]
    ngram_prompt_lookup_max: int | None = None  # None: DEFAULT_NGRAM_MAX
    ngram_prompt_lookup_min: int | None = None  # None: DEFAULT_NGRAM_MIN
    coordinator_address: str | None = None  # multi-host: host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if self.model is not None and self.preset is not None:
            raise ValueError("--model and --preset are mutually exclusive")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({' or '.join(TOOL_CALL_PARSERS)})")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r}: expected one of {list(TOOL_CALL_PARSERS)}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        method = self.speculative_method
        ngram_given = [n for n in ("ngram_prompt_lookup_max", "ngram_prompt_lookup_min") if getattr(self, n) is not None]
        if method is None:
            given = ["num_speculative_tokens"] if self.num_speculative_tokens else []
            given += ["speculative_model"] if self.speculative_model is not None else []
            if given + ngram_given:
                raise ValueError(f"{flag((given + ngram_given)[0])} needs --speculative-method ({' or '.join(SPECULATIVE_METHODS)})")
            return
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"--speculative-method {method!r}: expected one of {list(SPECULATIVE_METHODS)}")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"--speculative-method {method} needs --num-speculative-tokens >= 1, got {self.num_speculative_tokens}")
        if method == "draft":
            if self.speculative_model is None:
                raise ValueError("--speculative-method draft needs --speculative-model (a HF dir, a ferrum checkpoint, or preset:NAME[:SEED])")
            if ngram_given:
                raise ValueError(f"{flag(ngram_given[0])} only applies to --speculative-method ngram")
            return
        if self.speculative_model is not None:
            raise ValueError("--speculative-model only applies to --speculative-method draft")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"--ngram-prompt-lookup-min {self.ngram_min} and --ngram-prompt-lookup-max {self.ngram_max}: need 1 <= min <= max"
            )

    @property
    def executor_dtype(self) -> str | None:
        return _DTYPES[self.dtype]

    @property
    def speculative_tokens(self) -> int:
        """Draft tokens verified per decoding request and step; 0: speculation off."""
        if self.speculative_method is None:
            return 0
        return DEFAULT_SPECULATIVE_TOKENS if self.num_speculative_tokens is None else self.num_speculative_tokens

    @property
    def ngram_max(self) -> int:
        return DEFAULT_NGRAM_MAX if self.ngram_prompt_lookup_max is None else self.ngram_prompt_lookup_max

    @property
    def ngram_min(self) -> int:
        return DEFAULT_NGRAM_MIN if self.ngram_prompt_lookup_min is None else self.ngram_prompt_lookup_min


def _positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _nonnegative_float(text) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS as the default: the namespace holds only flags actually given, which is
    # what lets a flag override the config file and a file override the defaults.
    p = argparse.ArgumentParser(
        prog="python -m ferrum_jax.serve",
        description="OpenAI-compatible server over the ferrum_jax engine.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file with any of these settings (flags override it)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="HF model dir (config.json + safetensors), ferrum checkpoint, GGUF file, or preset name (default: SmolLM2-135M-Instruct, embedded)")
    which.add_argument("--preset", help="a model preset of configs/ (seeded random weights, byte-level tokenizer), e.g. bench_125m")
    p.add_argument("--tokenizer", help="dir with tokenizer.json, or 'byte' for the byte-level tokenizer (default: the model's)")
    p.add_argument("--served-model-name", nargs="+", help="model name(s) clients use; the first is reported")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-num-seqs", type=_positive_int, help="max sequences per engine iteration")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, help="max tokens per engine iteration")
    p.add_argument("--max-model-len", type=_positive_int, help="context length (prompt + completion)")
    p.add_argument("--max-waiting", type=_positive_int, help="queued requests beyond which new ones get 503 (default 256)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weights and KV dtype (default auto)")
    p.add_argument("--page-size", type=_positive_int, help="tokens per KV page")
    p.add_argument("--num-pages", type=_positive_int, help="KV pool size in pages, a page being page-size tokens of a group of "
                   "layers (ferrum_jax.kv.layout); default: max-num-seqs full-length sequences")
    p.add_argument("--attention", choices=["auto", "xla", "pallas"], help="attention implementation (default auto)")
    p.add_argument("--tensor-parallel-size", type=_positive_int, help="devices to shard the model over (default 1)")
    p.add_argument("--enable-expert-parallel", action="store_const", const=True,
                   help="split a mixture of experts' experts over the devices, whole experts each (attention stays "
                   "tensor-parallel); without it every device holds every expert's share of the width")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="reuse the KV of prompt prefixes already computed (default on)",
    )
    p.add_argument(
        "--quantization", choices=QUANTIZATION_METHODS,
        help="quantize the linear layers' weights on load: int8 (per output channel) or int4 (groups of 128)",
    )
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="KV page dtype: auto (the model's), int8 or fp8 (e4m3); "
                   "int8/fp8 with per-(layer, KV head) scales calibrated at load")
    p.add_argument(
        "--enable-auto-tool-choice", action="store_const", const=True,
        help="let the model decide to call tools (tool_choice auto); needs --tool-call-parser",
    )
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help="the model's tool-call format: hermes (<tool_call> JSON: Qwen2.5/Qwen3, SmolLM2, Hermes) or llama3_json (Llama 3.1+)")
    p.add_argument("--seed", type=int, help="seeds the per-request seeds of requests that give none (default 0)")
    p.add_argument("--shutdown-timeout", type=_nonnegative_float, help="seconds SIGTERM waits for in-flight requests (default 30)")
    p.add_argument("--no-warmup", action="store_const", const=True, help="skip compiling every step program at start")
    p.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-uvicorn-access-log", action="store_const", const=True)

    spec = p.add_argument_group("speculative decoding")
    spec.add_argument("--speculative-method", choices=SPECULATIVE_METHODS, help="ngram: prompt lookup; draft: a draft model (--speculative-model)")
    spec.add_argument(
        "--num-speculative-tokens", type=_nonnegative_int, help=f"draft tokens verified per step (default {DEFAULT_SPECULATIVE_TOKENS} with a method; 0: off)"
    )
    spec.add_argument(
        "--speculative-model", help="draft model: HF dir, ferrum checkpoint, or preset:NAME[:SEED]; same tokenizer and vocabulary as the target"
    )
    spec.add_argument("--ngram-prompt-lookup-max", type=_positive_int, help=f"longest n-gram looked up (default {DEFAULT_NGRAM_MAX})")
    spec.add_argument("--ngram-prompt-lookup-min", type=_positive_int, help=f"shortest n-gram looked up (default {DEFAULT_NGRAM_MIN})")

    hosts = p.add_argument_group("multi-host (default: what JAX reads itself, e.g. the TPU metadata; none: one host)")
    hosts.add_argument("--coordinator-address", help="host:port of process 0, the same on every host")
    hosts.add_argument("--num-processes", type=_positive_int, help="processes in the job, one per host")
    hosts.add_argument("--process-id", type=_nonnegative_int, help="this process's index, 0 .. num-processes-1")
    return p


def _from_file(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: {e}")
    if not isinstance(raw, dict):
        parser.error(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(ServeSettings)}
    # Each value goes through its flag's own converter, so a file is checked like a flag.
    actions = {a.dest: a for a in parser._actions}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            parser.error(f"--config {path}: unknown setting {key!r}; known: {sorted(known)}")
        action = actions[name]
        if action.nargs == "+":
            value = [value] if isinstance(value, str) else list(value)
        try:
            if action.const is True or isinstance(action, argparse.BooleanOptionalAction):
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif value is not None:
                convert = action.type or str
                value = [convert(v) for v in value] if isinstance(value, list) else convert(value)
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"expected one of {sorted(action.choices)}")
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            parser.error(f"--config {path}: {key}={value!r}: {e}")
        values[name] = value
    return values


def parse_settings(argv: list[str] | None = None) -> ServeSettings:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    config = flags.pop("config", None)
    from_file = _from_file(config, parser) if config else {}
    if "model" in flags or "preset" in flags:
        # Either flag names the model, so it replaces whichever of the two the file gave.
        from_file.pop("model", None)
        from_file.pop("preset", None)
    for name, value in from_file.items():
        if name not in flags and isinstance(value, str) and _PLACEHOLDER.fullmatch(value):
            parser.error(f"--config {config}: {name} is left as {value}, which must be replaced; give {flag(name)} on the command line")
    merged = {**from_file, **flags}
    if "served_model_name" in merged:
        merged["served_model_name"] = tuple(merged["served_model_name"])
    try:
        return ServeSettings(**merged)
    except ValueError as e:
        parser.error(str(e))
