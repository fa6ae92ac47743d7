"""`python -m ferrum_jax.serve`: the OpenAI-compatible server.

    python -m ferrum_jax.serve                         # SmolLM2-135M-Instruct (embedded default), 127.0.0.1:8000
    python -m ferrum_jax.serve --model DIR --port 8001 # a HF checkpoint with its tokenizer.json
    python -m ferrum_jax.serve --model x.gguf          # a GGUF checkpoint with its own tokenizer
    python -m ferrum_jax.serve --preset tiny           # the seeded random test model + byte tokenizer
    python -m ferrum_jax.serve --preset bench_125m     # another model preset (configs/)
    python -m ferrum_jax.serve --config configs/serve_cpu.yaml
    python -m ferrum_jax.serve --speculative-method ngram --num-speculative-tokens 4

Startup: join a multi-host job if asked (multihost.py; before anything else touches JAX),
build the tokenizer, the executor (weights, KV pool) and the drafter (speculative.py),
compile every program the engine will run on the target and on a draft model (`warmup` of
the families `program_plan.target_programs` / `DRAFT_PROGRAMS` name, so no request ever waits for a compile;
`--no-warmup` skips it), build the engine, then serve with
uvicorn on one event loop shared with the engine loop. Flags are in settings.py, model
loading in loading.py, shutdown behaviour in shutdown.py.

In a multi-host job (multihost.py) only process 0 runs all this, over executors wrapped in
`LockstepExecutor`; the others replay its executor calls, and the drain ends with the
`stop` that lets them exit.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from ferrum_jax.executor.program_plan import DRAFT_PROGRAMS, target_programs
from ferrum_jax.serve.settings import ServeSettings, parse_settings

logger = logging.getLogger("ferrum_jax.serve")


def build_context(s: ServeSettings, executor, tokenizer, drafter=None):
    """drafter: proposes `s.speculative_tokens` drafts per step (speculative.build_drafter)."""
    from ferrum_jax.default_model import DEFAULT_MODEL_NAME
    from ferrum_jax.engine import Engine, EngineConfig
    from ferrum_jax.engine.lockstep import LockstepExecutor
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
            num_speculative_tokens=s.speculative_tokens if drafter is not None else 0,
            async_scheduling=not isinstance(executor, LockstepExecutor),
        ),
        drafter,
    )
    root = s.model or s.preset or DEFAULT_MODEL_NAME
    names = s.served_model_name or (root,)
    return ServerContext(
        engine=engine,
        tokenizer=tokenizer,
        model_names=tuple(names),
        model_root=root,
        max_model_len=executor.max_sequence_length,
        max_waiting=s.max_waiting,
        metrics=ServerMetrics(engine, names[0]),
        api_key=s.api_key,
        tool_call_parser=s.tool_call_parser if s.enable_auto_tool_choice else None,
    )


async def serve(s: ServeSettings) -> None:
    from ferrum_jax.engine.lockstep import Channel, LockstepExecutor
    from ferrum_jax.serve.loading import build_executor, build_tokenizer
    from ferrum_jax.serve.multihost import is_multiprocess

    tokenizer = build_tokenizer(s)  # first: it fails fast, loading the weights does not
    executor = build_executor(s)
    if tokenizer.vocab_size > executor.cfg.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {executor.cfg.vocab_size}")
    channel = None
    if is_multiprocess():
        channel = Channel()
        executor = LockstepExecutor(executor, channel)
    try:
        await _serve(s, tokenizer, executor, channel)
    finally:
        if channel is not None:
            channel.stop()



async def _serve(s: ServeSettings, tokenizer, executor, channel) -> None:
    from ferrum_jax.engine.lockstep import LockstepExecutor
    from ferrum_jax.serve.app import build_app
    from ferrum_jax.serve.shutdown import DrainingServer
    from ferrum_jax.serve.speculative import build_drafter

    wrap = (lambda ex: LockstepExecutor(ex, channel, "draft")) if channel is not None else (lambda ex: ex)
    drafter, draft = build_drafter(s, executor, wrap)  # before the warmup: a vocabulary mismatch fails fast
    if not s.no_warmup:
        await executor.warmup(target_programs(drafter is not None))
        if draft is not None:
            await draft.warmup(DRAFT_PROGRAMS)
    ctx = build_context(s, executor, tokenizer, drafter)
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
    spec = f", speculative {s.speculative_method} x{s.speculative_tokens}" if drafter is not None else ""
    logger.info("serving %s (max_model_len=%d%s) on http://%s:%d", ctx.model_name, ctx.max_model_len, spec, s.host, s.port)
    await DrainingServer(config, ctx, s.shutdown_timeout).serve()


def main(argv: list[str] | None = None) -> None:
    from ferrum_jax.interfaces.errors import FerrumError
    from ferrum_jax.serve.multihost import is_leader, join, run_follower

    settings = parse_settings(argv)
    level = "DEBUG" if settings.uvicorn_log_level == "trace" else settings.uvicorn_log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        join(settings)  # the first JAX call: jax.distributed must start before any device is used
        if is_leader():
            asyncio.run(serve(settings))
        else:
            run_follower(settings)
    except FerrumError as e:  # a bad model dir, an unsupported option: a message, not a traceback
        raise SystemExit(f"python -m ferrum_jax.serve: {type(e).__name__}: {e.message}") from None


if __name__ == "__main__":
    main()
