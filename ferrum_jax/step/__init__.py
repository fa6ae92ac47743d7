"""The functionally pure, jit-compiled steps: `(state, kv_pages, batch[, sampling]) -> (out, kv_pages)`."""

from ferrum_jax.step.ragged_step import make_ragged_step, make_sampler
from ferrum_jax.step.sampling import SampledTokens, SamplingBatch, SamplingRow

__all__ = ["SampledTokens", "SamplingBatch", "SamplingRow", "make_ragged_step", "make_sampler"]
