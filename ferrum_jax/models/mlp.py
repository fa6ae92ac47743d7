"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.params import bias_param, weight_param


class MLP(nnx.Module):
    """`[tokens, hidden] -> [tokens, hidden]`; weights `gate/up [hidden, ffn]`, `down [ffn, hidden]`."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = weight_param(rngs, (d, f), d, dtype)
        self.up = weight_param(rngs, (d, f), d, dtype)
        self.down = weight_param(rngs, (f, d), f, dtype)
        self.gate_bias = bias_param((f,), dtype) if cfg.mlp_bias else None
        self.up_bias = bias_param((f,), dtype) if cfg.mlp_bias else None
        self.down_bias = bias_param((d,), dtype) if cfg.mlp_bias else None

    def __call__(self, x_td: jax.Array) -> jax.Array:
        gate_tf = jnp.einsum("td,df->tf", x_td, self.gate[...])
        up_tf = jnp.einsum("td,df->tf", x_td, self.up[...])
        if self.gate_bias is not None:
            gate_tf = gate_tf + self.gate_bias[...]
            up_tf = up_tf + self.up_bias[...]
        out_td = jnp.einsum("tf,fd->td", jax.nn.silu(gate_tf) * up_tf, self.down[...])
        if self.down_bias is not None:
            out_td = out_td + self.down_bias[...]
        return out_td
