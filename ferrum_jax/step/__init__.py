"""The functionally pure, jit-compiled step: `(state, kv_pages, batch) -> (logits, kv_pages)`."""

from ferrum_jax.step.ragged_step import make_ragged_step

__all__ = ["make_ragged_step"]
