"""`python -m ferrum_jax.serve`: the OpenAI-compatible server.

    python -m ferrum_jax.serve                         # tiny preset + byte tokenizer, 127.0.0.1:8000
    python -m ferrum_jax.serve --model DIR --port 8001 # a HF checkpoint with its tokenizer.json
    python -m ferrum_jax.serve --config configs/serve_cpu.yaml

Startup: build the executor (weights, KV pool), compile every step program (`warmup`, so
no request ever waits for a compile; `--no-warmup` skips it), build the tokenizer and the
engine, then serve with uvicorn on one event loop shared with the engine loop. Flags are
in settings.py, shutdown behaviour in shutdown.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import uvicorn

from ferrum_jax.serve.settings import ServeSettings, parse_settings

logger = logging.getLogger("ferrum_jax.serve")


def _is_preset(name: str) -> bool:
    from ferrum_jax.executor.presets import CONFIG_DIR

    return not Path(name).exists() and (CONFIG_DIR / f"{name}.yaml").is_file()


def build_executor(s: ServeSettings):
    import ferrum_jax as fj

    options = {
        k: v
        for k, v in {
            "dtype": s.executor_dtype,
            "page_size": s.page_size,
            "max_batch_size": s.max_num_seqs,
            "max_sequence_length": s.max_model_len,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "num_pages": s.num_pages,
            "attention": s.attention,
            "tensor_parallel_size": s.tensor_parallel_size,
        }.items()
        if v is not None
    }
    if s.model is None or _is_preset(s.model):
        return fj.JaxModelExecutor.from_preset(s.model or "tiny", **options)
    return fj.JaxModelExecutor.from_pretrained(s.model, **options)


def build_tokenizer(s: ServeSettings):
    from ferrum_jax.interfaces.errors import FerrumError
    from ferrum_jax.serve.tokenizer import load_tokenizer

    if s.tokenizer == "byte" or (s.tokenizer is None and (s.model is None or _is_preset(s.model))):
        # Presets ship no tokenizer files; their vocabularies fit the byte-level one.
        return load_tokenizer(None)
    try:
        return load_tokenizer(s.tokenizer or s.model)
    except FerrumError as e:
        raise FerrumError.invalid_config(f"{e.message}; pass --tokenizer DIR, or --tokenizer byte for the byte-level tokenizer") from e


def build_context(s: ServeSettings, executor, tokenizer):
    from ferrum_jax.engine import Engine, EngineConfig
    from ferrum_jax.serve.context import ServerContext
    from ferrum_jax.serve.metrics import ServerMetrics

    engine = Engine(
        executor,
        EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            max_waiting=s.max_waiting,
            eos_token_ids=tuple(tokenizer.eos_token_ids),
            seed=s.seed,
        ),
    )
    names = s.served_model_name or (s.model or "tiny",)
    return ServerContext(
        engine=engine,
        tokenizer=tokenizer,
        model_names=tuple(names),
        model_root=s.model or "tiny",
        max_model_len=executor.max_sequence_length,
        max_waiting=s.max_waiting,
        metrics=ServerMetrics(engine, names[0]),
        api_key=s.api_key,
    )


async def serve(s: ServeSettings) -> None:
    from ferrum_jax.serve.app import build_app
    from ferrum_jax.serve.shutdown import DrainingServer

    tokenizer = build_tokenizer(s)  # first: it fails fast, loading the weights does not
    executor = build_executor(s)
    if tokenizer.vocab_size > executor.cfg.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {executor.cfg.vocab_size}")
    if not s.no_warmup:
        await executor.warmup()
    ctx = build_context(s, executor, tokenizer)
    config = uvicorn.Config(
        build_app(ctx),
        host=s.host,
        port=s.port,
        log_level=s.uvicorn_log_level,
        access_log=not s.disable_uvicorn_access_log,
        # The drain already waited for in-flight requests; this only bounds sending the
        # last bytes of replies that finished.
        timeout_graceful_shutdown=5,
    )
    logger.info("serving %s (max_model_len=%d) on http://%s:%d", ctx.model_name, ctx.max_model_len, s.host, s.port)
    await DrainingServer(config, ctx, s.shutdown_timeout).serve()


def main(argv: list[str] | None = None) -> None:
    from ferrum_jax.interfaces.errors import FerrumError

    settings = parse_settings(argv)
    level = "DEBUG" if settings.uvicorn_log_level == "trace" else settings.uvicorn_log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except FerrumError as e:  # a bad model dir, an unsupported option: a message, not a traceback
        raise SystemExit(f"python -m ferrum_jax.serve: {type(e).__name__}: {e.message}") from None


if __name__ == "__main__":
    main()
