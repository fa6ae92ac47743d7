"""The decoder-only causal LM (Llama / Mistral / Qwen2 / Qwen3) as Flax NNX modules.

`CausalLM.__call__` is pure given its parameters: it takes a flat ragged token batch and
the per-layer KV pages and returns logits for the requested rows plus the updated pages.
The executor splits the module once into (graphdef, state) so the jitted step is a pure
function of the state pytree.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.attention import Attention
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.mlp import MLP
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata
from ferrum_jax.models.params import weight_param
from ferrum_jax.models.rope import inverse_frequencies, rope_cos_sin


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, cfg.sliding_windows[layer], dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, h_td, cos_td, sin_td, k_pages, v_pages, meta, backend):
        attn_td, k_pages, v_pages = self.attn(self.input_norm(h_td), cos_td, sin_td, k_pages, v_pages, meta, backend)
        h_td = h_td + attn_td
        h_td = h_td + self.mlp(self.post_attn_norm(h_td))
        return h_td, k_pages, v_pages


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        # A tuple, not an array: NNX keeps it in the (hashable) graphdef as static data.
        self.inv_freq = tuple(float(f) for f in inverse_frequencies(cfg.rope, cfg.head_dim))
        self.embed = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32) * 0.02).astype(dtype)
        )
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings else weight_param(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.hidden_size, dtype)
        )

    def __call__(
        self,
        token_ids_t: jax.Array,
        positions_t: jax.Array,
        k_pages: list[jax.Array],
        v_pages: list[jax.Array],
        meta: AttentionMetadata,
        logits_indices_l: jax.Array,
        backend: AttentionBackend,
    ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """Forward over `[tokens]`; returns float32 logits `[rows, vocab]` for `logits_indices_l`.

        k_pages / v_pages: per layer `[kv_heads, num_pages, page_size, head_dim]`.
        """
        (t,) = token_ids_t.shape
        chex.assert_shape(positions_t, (t,))
        h_td = jnp.take(self.embed[...], token_ids_t, axis=0)
        cos_td, sin_td = rope_cos_sin(positions_t, self.inv_freq)
        new_k, new_v = [], []
        for layer, k, v in zip(self.layers, k_pages, v_pages):
            h_td, k, v = layer(h_td, cos_td, sin_td, k, v, meta, backend)
            new_k.append(k)
            new_v.append(v)
        h_ld = self.final_norm(jnp.take(h_td, logits_indices_l, axis=0))
        if self.lm_head is None:
            # Contract with the embedding as stored, [vocab, hidden]: a `.T` here made XLA:CPU
            # write a transposed copy of the whole table on every step.
            logits_lv = jnp.einsum("ld,vd->lv", h_ld, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits_lv = jnp.einsum("ld,dv->lv", h_ld, self.lm_head[...], preferred_element_type=jnp.float32)
        chex.assert_shape(logits_lv, (logits_indices_l.shape[0], self.cfg.vocab_size))
        return logits_lv.astype(jnp.float32), new_k, new_v
