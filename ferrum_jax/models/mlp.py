"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.params import bias_param
from ferrum_jax.models.quantization import Quantization, linear_param, project


class MLP(nnx.Module):
    """`[tokens, hidden] -> [tokens, hidden]`; weights `gate/up [hidden, ffn]`, `down [ffn, hidden]`
    (int8/int4 with `*_scale` beside them when quantized, see quantization)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = dtype
        self.gate, self.gate_scale = linear_param(rngs, (d, f), 1, dtype, quant)
        self.up, self.up_scale = linear_param(rngs, (d, f), 1, dtype, quant)
        self.down, self.down_scale = linear_param(rngs, (f, d), 1, dtype, quant)
        self.gate_bias = bias_param((f,), dtype) if cfg.mlp_bias else None
        self.up_bias = bias_param((f,), dtype) if cfg.mlp_bias else None
        self.down_bias = bias_param((d,), dtype) if cfg.mlp_bias else None

    def __call__(self, x_td: jax.Array, backend=None) -> jax.Array:
        """backend: the step's AttentionBackend, which says whether int4 takes the GPU kernel."""
        gate_tf = project(x_td, self.gate, self.gate_scale, 1, self.dtype, backend=backend, parallel="column")
        up_tf = project(x_td, self.up, self.up_scale, 1, self.dtype, backend=backend, parallel="column")
        if self.gate_bias is not None:
            gate_tf = gate_tf + self.gate_bias[...]
            up_tf = up_tf + self.up_bias[...]
        out_td = project(jax.nn.silu(gate_tf) * up_tf, self.down, self.down_scale, 1, self.dtype, backend=backend, parallel="row")
        if self.down_bias is not None:
            out_td = out_td + self.down_bias[...]
        return out_td
