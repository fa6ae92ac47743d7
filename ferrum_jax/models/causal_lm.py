"""The decoder-only causal LM (Llama / Mistral / Qwen2 / Qwen3) as Flax NNX modules.

`CausalLM.__call__` is pure given its parameters: it takes a flat ragged token batch and
the stacked KV pages and returns logits for the requested rows plus the updated pages.
The executor splits the module once into (graphdef, state) so the jitted step is a pure
function of the state pytree.

The decoder layers are ONE `DecoderLayer` whose parameters carry a leading layer axis
(`[num_layers, ...]`, built with `nnx.vmap`), and the forward loops over them with
`lax.fori_loop`: XLA compiles the layer body once, so compile time does not grow with depth.
The KV pool rides in the loop carry and is updated in place. Layers with different sliding
windows run as consecutive loops, one per run of equal windows (the window is static for the
attention kernels); a typical model is one run.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.attention import Attention
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.models.mlp import MLP
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata, for_layer
from ferrum_jax.models.quantization import Quantization, linear_param, project
from ferrum_jax.models.rope import inverse_frequencies, rope_cos_sin


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs, quant=quant)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, quant=quant)

    def __call__(self, h_td, cos_td, sin_td, k_pages, v_pages, meta, backend, sliding_window, k_scale=None, v_scale=None):
        attn_td, k_pages, v_pages = self.attn(
            self.input_norm(h_td), cos_td, sin_td, k_pages, v_pages, meta, backend, sliding_window, k_scale, v_scale
        )
        h_td = h_td + attn_td
        h_td = h_td + self.mlp(self.post_attn_norm(h_td), backend)
        return h_td, k_pages, v_pages


def window_runs(windows: tuple[int | None, ...]) -> list[tuple[int, int, int | None]]:
    """Consecutive layers sharing a sliding window: `[(first, stop, window), ...]`."""
    runs, first = [], 0
    for window, group in itertools.groupby(windows):
        stop = first + len(list(group))
        runs.append((first, stop, window))
        first = stop
    return runs


class CausalLM(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, vocab_rows: int | None = None,
        quant: Quantization | None = None,
    ):
        """vocab_rows: the embedding's and lm_head's vocabulary axis, the vocabulary padded for
        tensor parallelism (see vocab_padding); None: the vocabulary itself. quant: weight-only
        quantization of the linear layers (see quantization)."""
        self.cfg = cfg
        self.dtype = dtype
        vocab_rows = vocab_rows or cfg.vocab_size
        # A tuple, not an array: NNX keeps it in the (hashable) graphdef as static data.
        self.inv_freq = tuple(float(f) for f in inverse_frequencies(cfg.rope, cfg.head_dim))
        self.embed = nnx.Param(
            (jax.random.normal(rngs.params(), (vocab_rows, cfg.hidden_size), jnp.float32) * 0.02).astype(dtype)
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs):
            return DecoderLayer(cfg, dtype=dtype, rngs=rngs, quant=quant)

        self.layers = stacked_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head, self.lm_head_scale = (
            (None, None) if cfg.tie_word_embeddings else linear_param(rngs, (cfg.hidden_size, vocab_rows), 1, dtype, quant)
        )

    def __call__(
        self,
        token_ids_t: jax.Array,
        positions_t: jax.Array,
        k_pages: jax.Array,
        v_pages: jax.Array,
        meta: AttentionMetadata,
        logits_indices_l: jax.Array,
        backend: AttentionBackend,
        k_scale: jax.Array | None = None,
        v_scale: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Forward over `[tokens]`; returns float32 logits `[rows, vocab]` for `logits_indices_l`.

        k_pages / v_pages: `[kv_rows, num_layers * num_pages, page_size, head_dim]` (kv.pages);
        k_scale / v_scale: `[kv_rows, num_layers]`, the scales of narrow pages, else None.
        """
        (t,) = token_ids_t.shape
        chex.assert_shape(positions_t, (t,))
        num_pages, page_size = k_pages.shape[1] // self.cfg.num_layers, k_pages.shape[2]
        h_td = jnp.take(self.embed[...], token_ids_t, axis=0)
        cos_td, sin_td = rope_cos_sin(positions_t, self.inv_freq)
        layer_def, layer_state = nnx.split(self.layers)
        carry = (h_td, k_pages, v_pages)
        for first, stop, window in window_runs(self.cfg.sliding_windows):

            def body(i, carry, window=window):
                h_td, k_pages, v_pages = carry
                layer = nnx.merge(layer_def, jax.tree.map(lambda x: LayerSlice(x, i), layer_state))
                layer_meta = for_layer(meta, i, num_pages, page_size)
                scales = () if k_scale is None else (k_scale[:, i], v_scale[:, i])
                return layer(h_td, cos_td, sin_td, k_pages, v_pages, layer_meta, backend, window, *scales)

            carry = jax.lax.fori_loop(first, stop, body, carry)
        h_td, k_pages, v_pages = carry
        h_ld = self.final_norm(jnp.take(h_td, logits_indices_l, axis=0))
        if self.lm_head is None:
            # Contract with the embedding as stored, [vocab, hidden]: a `.T` here made XLA:CPU
            # write a transposed copy of the whole table on every step.
            logits_lv = jnp.einsum("ld,vd->lv", h_ld, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits_lv = project(
                h_ld, self.lm_head, self.lm_head_scale, 1, self.dtype, out_dtype=jnp.float32, backend=backend, parallel="column"
            )
        # Padding columns of a vocabulary padded for tensor parallelism are never a token.
        logits_lv = logits_lv[:, : self.cfg.vocab_size]
        chex.assert_shape(logits_lv, (logits_indices_l.shape[0], self.cfg.vocab_size))
        return logits_lv.astype(jnp.float32), k_pages, v_pages
