"""Sparse mixture-of-experts MLP: each token through its top-k experts, no token ever dropped.

Routing as transformers computes it (Qwen3-MoE, Mixtral): router logits in the model dtype,
softmax in float32, top-k, the k weights renormalized to sum to 1 where the model says
(`norm_topk_prob`; Mixtral always), then used in the model dtype (Qwen3-MoE) or float32
(Mixtral) to scale each expert's output before the outputs are summed per token.

Experts are stacked gated MLPs: `gate/up [experts, hidden, ffn]`, `down [experts, ffn, hidden]`.
Two ways to run them, chosen by the step's static shape:
- grouped (more token-expert pairs than experts: prefill): the pairs sorted by expert, every
  expert's rows one group of `jax.lax.ragged_dot` (dropless: a group is as long as its tokens
  make it), the outputs unsorted and summed per token;
- gathered (fewer pairs than experts: decode): each pair gathers its expert's weights from the
  stack, so the step reads only the experts some token chose, not the whole stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations
from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.models.mlp import ACTIVATIONS
from ferrum_jax.models.quantization import Quantization

PARAMS = ("router", "gate", "up", "down")


class SparseMoE(nnx.Module):
    """`[tokens, hidden] -> [tokens, hidden]`; parameters `layers.moe.{router, gate, up, down}`."""

    def __init__(self, cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        if quant is not None:
            raise FerrumError.unsupported(
                f"quantization={quant.method!r} of a mixture-of-experts model: expert weights are float only for now")
        self.k, self.norm_topk, self.float32_weights = cfg.experts_per_token, cfg.norm_topk_prob, cfg.moe_float32_weights
        self.hidden_act = cfg.hidden_act
        for name in PARAMS:
            shape = decls[f"layers.moe.{name}"].shape
            w = jax.random.normal(rngs.params(), shape, jnp.float32) / shape[-2] ** 0.5
            setattr(self, name, nnx.Param(w.astype(dtype)))

    def __call__(self, x_td: jax.Array, backend=None) -> jax.Array:
        del backend  # the experts take XLA's ragged dot or gathers on every platform
        logits_te = x_td @ self.router[...]
        probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
        weights_tk, experts_tk = jax.lax.top_k(probs_te, self.k)
        if self.norm_topk:
            weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
        if not self.float32_weights:
            weights_tk = weights_tk.astype(x_td.dtype)
        experts = (self.gate, self.up, self.down)
        if experts_tk.size < self.gate.shape[0]:
            return _gathered(x_td, experts_tk, weights_tk, experts, ACTIVATIONS[self.hidden_act])
        return _grouped(x_td, experts_tk, weights_tk, experts, ACTIVATIONS[self.hidden_act])


def _combine(y_nd: jax.Array, weights_n: jax.Array, token_n: jax.Array, num_tokens: int, dtype) -> jax.Array:
    """Each pair's output scaled by its routing weight, summed per token."""
    y_nd = (y_nd * weights_n[:, None]).astype(dtype)
    return jnp.zeros((num_tokens, y_nd.shape[1]), dtype).at[token_n].add(y_nd)


def _grouped(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    gate, up, down = (w[...] for w in experts)
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    x_nd = x_td[token]
    h_nf = act(jax.lax.ragged_dot(x_nd, gate, sizes)) * jax.lax.ragged_dot(x_nd, up, sizes)
    y_nd = jax.lax.ragged_dot(h_nf, down, sizes)
    return _combine(y_nd, weights_tk.reshape(-1)[order], token, t, x_td.dtype)


def _expert_rows(w, chosen: jax.Array) -> jax.Array:
    """`[pairs, ...]`: the chosen experts of a stack, read from it where it lies (a LayerSlice's
    layer of the stacked decoder weights: one gather, not the layer's whole slice first)."""
    if isinstance(w, LayerSlice):
        return w.stack[w.index, chosen]
    return w[...][chosen]


def _gathered(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    flat = experts_tk.reshape(-1)
    gate, up, down = (_expert_rows(w, flat) for w in experts)
    x_nd = jnp.repeat(x_td, k, axis=0)
    h_nf = act(jnp.einsum("nd,ndf->nf", x_nd, gate)) * jnp.einsum("nd,ndf->nf", x_nd, up)
    y_nd = jnp.einsum("nf,nfd->nd", h_nf, down)
    return _combine(y_nd, weights_tk.reshape(-1), jnp.repeat(jnp.arange(t), k), t, x_td.dtype)
