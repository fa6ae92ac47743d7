"""`python -m ferrum_jax.serve`: the OpenAI-compatible HTTP server over the engine.

Routes (app.py): /v1/completions and /v1/chat/completions (SSE streaming too), /v1/models,
/tokenize, /detokenize, /health, /metrics, /version. Start-up and flags: __main__.py and
settings.py; what is loaded: loading.py (model, tokenizer) and speculative.py (drafter).
"""
