"""Zero biases, shared by the modules (weights: quantization.linear_param).

Random init exists for the embedded preset and for tests; real models overwrite every
parameter from a checkpoint, so the init only has to be well-conditioned.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def bias_param(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))
