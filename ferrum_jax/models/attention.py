"""Self-attention over paged KV: q/k/v projections, optional q/k RMSNorm (Qwen3), RoPE,
KV write, ragged paged attention, output projection.

Weights are stored head-structured (`wq [hidden, q_heads, head_dim]`, `wo [q_heads,
head_dim, hidden]`) so the einsums name their axes and tensor parallelism can shard the
head axis directly.
"""

from __future__ import annotations

import jax
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.norm import RMSNorm
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata, write_and_attend
from ferrum_jax.models.params import bias_param
from ferrum_jax.models.quantization import Quantization, linear_param, project
from ferrum_jax.models.rope import apply_rope


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        d, hq, hk, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hk, hd
        self.dtype = dtype
        self.wq, self.wq_scale = linear_param(rngs, (d, hq, hd), 1, dtype, quant)
        self.wk, self.wk_scale = linear_param(rngs, (d, hk, hd), 1, dtype, quant)
        self.wv, self.wv_scale = linear_param(rngs, (d, hk, hd), 1, dtype, quant)
        self.wo, self.wo_scale = linear_param(rngs, (hq, hd, d), 2, dtype, quant)
        self.bq = bias_param((hq, hd), dtype) if cfg.qkv_bias else None
        self.bk = bias_param((hk, hd), dtype) if cfg.qkv_bias else None
        self.bv = bias_param((hk, hd), dtype) if cfg.qkv_bias else None
        self.bo = bias_param((d,), dtype) if cfg.o_bias else None
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None

    def __call__(
        self,
        x_td: jax.Array,
        cos_td: jax.Array,
        sin_td: jax.Array,
        k_pages: jax.Array,
        v_pages: jax.Array,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        sliding_window: int | None,
        k_scale: jax.Array | None = None,
        v_scale: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x_td [tokens, hidden]` -> (`[tokens, hidden]`, updated k_pages, v_pages).

        `meta` addresses this layer's pages (`paged_attention.for_layer`). The window is a call
        argument, not module state, because one module instance serves a whole stack of layers;
        so are `k_scale`/`v_scale`, the layer's scales of narrow KV pages (kv.pages)."""
        q_tnh = project(x_td, self.wq, self.wq_scale, 1, self.dtype, backend=backend, parallel="column")
        k_tkh = project(x_td, self.wk, self.wk_scale, 1, self.dtype, backend=backend, parallel="column")
        v_tkh = project(x_td, self.wv, self.wv_scale, 1, self.dtype, backend=backend, parallel="column")
        if self.bq is not None:
            q_tnh, k_tkh, v_tkh = q_tnh + self.bq[...], k_tkh + self.bk[...], v_tkh + self.bv[...]
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
            sm_scale=self.head_dim**-0.5,
            sliding_window=sliding_window,
            backend=backend,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        # One contraction over heads * head_dim: contracting (n, h) as two axes made XLA:CPU
        # write a relaid-out copy of wo on every step.
        t, n, h = attn_tnh.shape
        out_td = project(attn_tnh.reshape(t, n * h), self.wo, self.wo_scale, 2, self.dtype, backend=backend, parallel="row")
        if self.bo is not None:
            out_td = out_td + self.bo[...]
        return out_td, k_pages, v_pages
