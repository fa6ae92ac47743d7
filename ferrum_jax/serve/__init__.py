"""`python -m ferrum_jax.serve`: the HTTP front end (OpenAI-compatible routes arrive with the serving issue)."""
