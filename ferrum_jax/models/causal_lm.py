"""The decoder-only causal LM of every family, as Flax NNX modules.

`CausalLM.__call__` is pure given its parameters: it takes a flat ragged token batch and
the stacked KV pages and returns logits for the requested rows plus the updated pages.
The executor splits the module once into (graphdef, state) so the jitted step is a pure
function of the state pytree.

The family (models.registry) gives the parameter declarations and the decoder block. The
decoder layers are ONE block whose parameters carry a leading layer axis (`[num_layers, ...]`,
built with `nnx.vmap`), and the forward loops over them (models.layer_loops): XLA compiles the
layer body once per loop, so compile time does not grow with depth. The KV pool rides in the
loop carry and is updated in place.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.models.linear import Linear
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata, for_layer
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.registry import declarations, family
from ferrum_jax.models.rope import inverse_frequencies, rope_cos_sin


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
        decls = declarations(cfg, vocab_rows)
        # Tuples, not arrays: NNX keeps them in the (hashable) graphdef as static data. One
        # table per distinct RoPE; each layer kind names its table.
        ropes = sorted({cfg.layer_rope(i) for i in range(cfg.num_layers)}, key=repr)
        self.inv_freqs = tuple(tuple(float(f) for f in inverse_frequencies(r, cfg.head_dim)) for r in ropes)
        self.kinds = tuple((cfg.sliding_windows[i], ropes.index(cfg.layer_rope(i))) for i in range(cfg.num_layers))
        embed = decls["embed"]
        self.embed = nnx.Param((jax.random.normal(rngs.params(), embed.shape, jnp.float32) * 0.02).astype(dtype))
        block = family(cfg).block

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs):
            return block(cfg, decls, dtype=dtype, rngs=rngs, quant=quant)

        self.layers = stacked_layers(rngs)
        self.final_norm = RMSNorm(decls["final_norm.weight"], cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(decls, "lm_head", dtype=dtype, rngs=rngs, quant=quant)

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

        k_pages / v_pages: `[kv_rows, slots * num_pages, page_size, head_dim]` (kv.pages);
        k_scale / v_scale: `[kv_rows, num_layers]`, the scales of narrow pages, else None.
        """
        (t,) = token_ids_t.shape
        chex.assert_shape(positions_t, (t,))
        layout = kv_layout(self.cfg)
        num_pages, page_size = k_pages.shape[1] // layout.slots, k_pages.shape[2]
        h_td = jnp.take(self.embed[...], token_ids_t, axis=0)
        if self.cfg.embed_scale:
            # HF rounds the scale to the model dtype before multiplying.
            h_td = h_td * jnp.asarray(math.sqrt(self.cfg.hidden_size), h_td.dtype)
        ropes = [rope_cos_sin(positions_t, inv_freq) for inv_freq in self.inv_freqs]
        layer_def, layer_state = nnx.split(self.layers)

        def run_layer(i, b, kind, place, carry):
            """Layer `i` of `kind`, iteration `b` of its loop, its KV at `place` (kv.layout)."""
            h_td, k_pages, v_pages = carry
            window, rope = kind
            layer = nnx.merge(layer_def, jax.tree.map(lambda x: LayerSlice(x, i), layer_state))
            layer_meta = for_layer(meta, place.group, place.slot(b), num_pages, page_size)
            scales = () if k_scale is None else (k_scale[:, i], v_scale[:, i])
            return layer(h_td, ropes[rope], k_pages, v_pages, layer_meta, backend, window, *scales)

        carry = (h_td, k_pages, v_pages)
        for loop, places in zip(layout.loops, layout.placements):
            # A loop's layers at one block position share their kind: take the first's.
            kinds = [self.kinds[loop.first + j] for j in range(len(loop.block))]
            if len(loop.block) == 1:
                body = lambda i, carry, loop=loop, kind=kinds[0], place=places[0]: run_layer(  # noqa: E731
                    i, i - loop.first, kind, place, carry)
                carry = jax.lax.fori_loop(loop.first, loop.stop, body, carry)
                continue

            def block_body(b, carry, loop=loop, kinds=kinds, places=places):
                for j, (kind, place) in enumerate(zip(kinds, places)):
                    carry = run_layer(loop.first + b * len(loop.block) + j, b, kind, place, carry)
                return carry

            carry = jax.lax.fori_loop(0, loop.count, block_body, carry)
        h_td, k_pages, v_pages = carry
        h_ld = self.final_norm(jnp.take(h_td, logits_indices_l, axis=0))
        if self.lm_head is None:
            # Contract with the embedding as stored, [vocab, hidden]: a `.T` here made XLA:CPU
            # write a transposed copy of the whole table on every step.
            logits_lv = jnp.einsum("ld,vd->lv", h_ld, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits_lv = self.lm_head(h_ld, backend, out_dtype=jnp.float32)
        # Padding columns of a vocabulary padded for tensor parallelism are never a token.
        logits_lv = logits_lv[:, : self.cfg.vocab_size].astype(jnp.float32)
        if self.cfg.final_soft_cap is not None:
            cap = self.cfg.final_soft_cap
            logits_lv = cap * jnp.tanh(logits_lv / cap)
        chex.assert_shape(logits_lv, (logits_indices_l.shape[0], self.cfg.vocab_size))
        return logits_lv, k_pages, v_pages
