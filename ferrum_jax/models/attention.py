"""Self-attention over paged KV: q/k/v projections (bias optional), optional q/k RMSNorm (Qwen3,
Gemma 3), RoPE, KV write, ragged paged attention (score scale and soft-cap from the config),
output projection.

Weights are 2-D with the heads flattened into head_dim (`wq [hidden, q_heads * head_dim]`,
`wo [q_heads * head_dim, hidden]`, models.families.llama): tensor parallelism splits the flat
axis at head boundaries, XLA:CPU contracts them as before (the projections always ran as one
`[K, N]` dot), and on TPU the grouped int4/int8 kernels read each layer's q/k/v/o codes in
place from the stack, as they read the MLP's (held `[hidden, heads, head_dim]`, each layer was
sliced and flattened out for the kernel).
"""

from __future__ import annotations

import jax
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations
from ferrum_jax.models.linear import Linear
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata, write_and_attend
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.rope import apply_rope


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        self.sm_scale, self.soft_cap = cfg.sm_scale, cfg.attn_soft_cap
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = Linear(decls, "layers.attn.wq", dtype=dtype, rngs=rngs, quant=quant)
        self.wk = Linear(decls, "layers.attn.wk", dtype=dtype, rngs=rngs, quant=quant)
        self.wv = Linear(decls, "layers.attn.wv", dtype=dtype, rngs=rngs, quant=quant)
        self.wo = Linear(decls, "layers.attn.wo", dtype=dtype, rngs=rngs, quant=quant)
        norms = [decls.get(f"layers.attn.{n}.weight") for n in ("q_norm", "k_norm")]
        self.q_norm, self.k_norm = (
            None if d is None else RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset) for d in norms
        )

    def __call__(
        self,
        x_td: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        k_pages: jax.Array,
        v_pages: jax.Array,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        sliding_window: int | None,
        k_scale: jax.Array | None = None,
        v_scale: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x_td [tokens, hidden]` -> (`[tokens, hidden]`, updated k_pages, v_pages).

        rope: this layer's (cos, sin) `[tokens, head_dim]`. `meta` addresses this layer's pages
        (`paged_attention.for_layer`). The window is a call argument, not module state, because
        one module instance serves a whole stack of layers; so are `k_scale`/`v_scale`, the
        layer's scales of narrow KV pages (kv.pages)."""
        cos_td, sin_td = rope
        t, hd = x_td.shape[0], self.head_dim
        q_tnh = self.wq(x_td, backend).reshape(t, self.num_heads, hd)
        k_tkh = self.wk(x_td, backend).reshape(t, self.num_kv_heads, hd)
        v_tkh = self.wv(x_td, backend).reshape(t, self.num_kv_heads, hd)
        if self.q_norm is not None:
            q_tnh, k_tkh = self.q_norm(q_tnh), self.k_norm(k_tkh)
        q_tnh = apply_rope(q_tnh, cos_td, sin_td)
        k_tkh = apply_rope(k_tkh, cos_td, sin_td)
        attn_tnh, k_pages, v_pages = write_and_attend(
            q_tnh,
            k_tkh,
            v_tkh,
            k_pages,
            v_pages,
            meta,
            sm_scale=self.sm_scale,
            sliding_window=sliding_window,
            soft_cap=self.soft_cap,
            backend=backend,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        # One contraction over heads * head_dim: contracting (n, h) as two axes made XLA:CPU
        # write a relaid-out copy of wo on every step.
        return self.wo(attn_tnh.reshape(t, self.num_heads * hd), backend), k_pages, v_pages
