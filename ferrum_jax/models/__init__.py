"""Pure model math: config, parameters, the forward over a ragged batch and the KV pages."""

from ferrum_jax.models.causal_lm import CausalLM
from ferrum_jax.models.config import ModelConfig, RopeConfig

__all__ = ["CausalLM", "ModelConfig", "RopeConfig"]
