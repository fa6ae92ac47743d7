"""`python -m ferrum_jax.serve`: loads the model (the embedded `tiny` preset by default, or
`--model DIR`), warms every step program up, and serves `/health` and `/v1/models`.

The OpenAI completion routes, the engine and the tokenizer arrive with the serving issue;
until then this is the documented bring-up check of a model on a machine.
"""

from __future__ import annotations

import argparse
import asyncio


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.serve")
    p.add_argument("--model", default=None, help="HF model directory or ferrum checkpoint (default: tiny preset)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every step shape at start")
    return p.parse_args(argv)


def build_executor(args: argparse.Namespace):
    import ferrum_jax as fj

    options = {
        k: v
        for k, v in {
            "dtype": args.dtype,
            "max_batch_size": args.max_num_seqs,
            "max_sequence_length": args.max_model_len,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        }.items()
        if v is not None
    }
    if args.model is None:
        return fj.JaxModelExecutor.from_preset("tiny", **options)
    return fj.JaxModelExecutor.from_pretrained(args.model, **options)


def main(argv=None) -> None:
    import uvicorn
    from fastapi import FastAPI

    args = parse_args(argv)
    executor = build_executor(args)
    if not args.no_warmup:
        asyncio.run(executor.warmup())
    app = FastAPI(title="ferrum_jax")

    @app.get("/health")
    def health():
        return {"status": "ok", "state": executor.status().state.name}

    @app.get("/v1/models")
    def models():
        info = executor.info()
        return {
            "object": "list",
            "data": [{"id": info.model_id, "object": "model", "owned_by": "ferrum_jax", "max_model_len": info.max_sequence_length}],
        }

    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
