"""The FastAPI application: routes, API-key check, engine lifetime.

    /v1/completions, /v1/chat/completions   generation (serving_completion.py, serving_chat.py)
    /v1/models, /v1/models/{id}             the served model
    /tokenize, /detokenize                  vLLM's shapes
    /health                                 200 while the engine loop runs, 503 once it died or while draining
    /metrics                                Prometheus text (metrics.py)
    /version                                the package version

As in vLLM, `--api-key` guards the `/v1` routes only; health, metrics and tokenization
stay open for probes and tooling. The engine loop starts in the app's lifespan, on the
event loop uvicorn serves from, and is stopped when the app shuts down.
"""

from __future__ import annotations

import contextlib
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import ferrum_jax
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.context import ServerContext
from ferrum_jax.serve.errors import APIError, install_error_handlers
from ferrum_jax.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ferrum_jax.serve.serving_chat import create_chat_completion, render_chat
from ferrum_jax.serve.serving_completion import create_completion


def build_app(ctx: ServerContext) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await ctx.engine.start()
        try:
            yield
        finally:
            await ctx.engine.stop()

    app = FastAPI(title="ferrum_jax", version=ferrum_jax.__version__, lifespan=lifespan)
    install_error_handlers(app)
    created = int(time.time())

    def require_api_key(request: Request) -> None:
        if ctx.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {ctx.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await create_completion(ctx, body, raw)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, body, raw)

    def model_card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "ferrum_jax",
            "root": ctx.model_root,
            "parent": None,
            "max_model_len": ctx.max_model_len,
        }

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in ctx.model_names]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        return model_card(ctx.check_model(model))

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError.bad_request("give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = ctx.tokenizer.encode(body.prompt, add_special_tokens=add_special)
        else:
            ids = render_chat(
                ctx, body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs, add_special_tokens=bool(body.add_special_tokens)
            )
        return {
            "count": len(ids),
            "max_model_len": ctx.max_model_len,
            "tokens": ids,
            "token_strs": ctx.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        try:
            return {"prompt": ctx.tokenizer.decode(body.tokens)}
        except FerrumError as e:
            raise APIError.from_ferrum(e, param="tokens") from e

    @app.get("/health")
    async def health():
        if ctx.draining:
            return APIError(503, "the server is shutting down", type="server_error").response()
        if not ctx.engine.is_alive:
            return APIError(503, "the engine loop is not running", type="server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": ferrum_jax.__version__}

    return app
