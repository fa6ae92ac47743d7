"""RMSNorm as HF computes it: statistics in float32.

Llama's applies its weight in the input dtype (`w * normed.astype(dtype)`); Gemma's stores the
weight as an offset from one and applies it in float32 (`(normed * (1 + w)).astype(dtype)`),
which differs from Llama's in bfloat16 (transformers PR 29402).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.declare import ParamDecl


class RMSNorm(nnx.Module):
    def __init__(self, decl: ParamDecl, eps: float, *, dtype, unit_offset: bool = False):
        """decl: the weight's declaration (its shape and init); unit_offset: Gemma's `1 + w`."""
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nnx.Param((jnp.zeros if decl.init == "zeros" else jnp.ones)(decl.shape, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)
