"""/health follows the engine loop: 200 while it runs, 503 (and generation refused with
503) once it is gone. In-process over ASGI, since a live server's loop cannot be stopped
from outside without stopping the server."""

from __future__ import annotations

import asyncio

import httpx

import ferrum_jax as fj
from ferrum_jax.serve.__main__ import build_context
from ferrum_jax.serve.app import build_app
from ferrum_jax.serve.byte_tokenizer import ByteTokenizer
from ferrum_jax.serve.settings import parse_settings


def test_health_is_503_once_the_engine_loop_is_gone():
    settings = parse_settings(["--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--max-model-len", "64"])
    executor = fj.JaxModelExecutor.from_preset("tiny", max_batch_size=2, max_num_batched_tokens=16, max_sequence_length=64)
    ctx = build_context(settings, executor, ByteTokenizer())
    app = build_app(ctx)

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                assert (await http.get("/health")).status_code == 200
                await ctx.engine.stop()
                r = await http.get("/health")
                assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
                r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503 and "engine loop is not running" in r.json()["error"]["message"]

    asyncio.run(run())
