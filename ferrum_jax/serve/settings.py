"""Server settings: vLLM-named command-line flags, optionally preloaded from a YAML file.

    python -m ferrum_jax.serve --max-num-seqs 8 --port 8001
    python -m ferrum_jax.serve --config configs/serve_cpu.yaml --port 8001

A `--config` file holds the same settings as the flags, spelled either way
(`max-num-seqs` or `max_num_seqs`); precedence is built-in default < file < flag, so a
file can be reused with one value changed on the command line. Unknown keys in the file
are an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

# vLLM's --dtype spellings, mapped onto the executor's dtype names (None: its default).
_DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model: str | None = None  # HF model dir, ferrum checkpoint dir, or preset name; None: the tiny preset
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
    seed: int = 0
    shutdown_timeout: float = 30.0
    no_warmup: bool = False
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False

    @property
    def executor_dtype(self) -> str | None:
        return _DTYPES[self.dtype]


def _positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
    p.add_argument("--model", help="HF model dir (config.json + safetensors), ferrum checkpoint, or preset name (default: tiny)")
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
    p.add_argument("--num-pages", type=_positive_int, help="KV pool size in pages (default: max-num-seqs full-length sequences)")
    p.add_argument("--attention", choices=["auto", "xla", "pallas"], help="attention implementation (default auto)")
    p.add_argument("--tensor-parallel-size", type=_positive_int, help="devices to shard the model over (default 1)")
    p.add_argument("--seed", type=int, help="seeds the per-request seeds of requests that give none (default 0)")
    p.add_argument("--shutdown-timeout", type=_nonnegative_float, help="seconds SIGTERM waits for in-flight requests (default 30)")
    p.add_argument("--no-warmup", action="store_const", const=True, help="skip compiling every step program at start")
    p.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-uvicorn-access-log", action="store_const", const=True)
    return p


def _from_file(path: str, parser: argparse.ArgumentParser) -> dict:
    raw = yaml.safe_load(Path(path).read_text()) or {}
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
            if action.const is True:
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
    merged = {**(_from_file(config, parser) if config else {}), **flags}
    if "served_model_name" in merged:
        merged["served_model_name"] = tuple(merged["served_model_name"])
    return ServeSettings(**merged)
