"""Gated feed-forward: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (Gemma's GeGLU)."""

from __future__ import annotations

import jax
from flax import nnx

from ferrum_jax.models.declare import Declarations
from ferrum_jax.models.linear import Linear
from ferrum_jax.models.quantization import Quantization

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
    """`[tokens, hidden] -> [tokens, hidden]`; `gate/up [hidden, ffn]`, `down [ffn, hidden]` (see linear)."""

    def __init__(self, decls: Declarations, hidden_act: str, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        self.hidden_act = hidden_act
        self.gate = Linear(decls, "layers.mlp.gate", dtype=dtype, rngs=rngs, quant=quant)
        self.up = Linear(decls, "layers.mlp.up", dtype=dtype, rngs=rngs, quant=quant)
        self.down = Linear(decls, "layers.mlp.down", dtype=dtype, rngs=rngs, quant=quant)

    def __call__(self, x_td: jax.Array, backend=None) -> jax.Array:
        """backend: the step's AttentionBackend, which says whether grouped codes take a kernel."""
        act = ACTIVATIONS[self.hidden_act]
        return self.down(act(self.gate(x_td, backend)) * self.up(x_td, backend), backend)
