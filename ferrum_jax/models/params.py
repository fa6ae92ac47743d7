"""Parameter constructors shared by the modules: scaled-normal weights, zero biases.

Random init exists for the embedded preset and for tests; real models overwrite every
parameter from a checkpoint, so the init only has to be well-conditioned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def weight_param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) / fan_in**0.5).astype(dtype))


def bias_param(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))
