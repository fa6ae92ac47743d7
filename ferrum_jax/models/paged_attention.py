"""The one attention dispatch point: write new K/V into the pages, then attend.

KV page layout (per layer, K and V separately): `[num_kv_heads, num_pages, page_size,
head_dim]`, identical to what `pallas_kernels.ragged_paged_attention` reads, so no relayout
ever happens per step. The leading kv-head axis is the one tensor parallelism shards.

`impl` is resolved by the executor from `attention="auto" | "xla" | "pallas"`:
`"xla"` is the pure-jnp reference (the CPU default), `"pallas"` the kernel for the current
backend, `"pallas_interpret"` the kernel in Pallas interpret mode (tests on CPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

IMPLS = ("xla", "pallas", "pallas_interpret")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step ragged layout shared by every layer.

    slot_mapping `[tokens]`: flat slot (page * page_size + offset) each new token's K/V goes to;
    padding tokens point into the reserved page 0.
    cu_q_lens `[seqs + 1]`, kv_lens `[seqs]` (including the new tokens),
    page_table `[seqs, pages_per_seq]`, num_seqs `[]` (sequences past it are padding).
    """

    slot_mapping: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    num_seqs: jax.Array


def write_kv(pages_hpsd: jax.Array, new_tkh: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatters `new_tkh` `[tokens, kv_heads, head_dim]` into the pages at `slot_mapping`."""
    h, p, s, d = pages_hpsd.shape
    flat = pages_hpsd.reshape(h, p * s, d)
    flat = flat.at[:, slot_mapping, :].set(jnp.swapaxes(new_tkh, 0, 1).astype(flat.dtype))
    return flat.reshape(h, p, s, d)


def paged_attention(
    q_tnh: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    impl: str,
) -> jax.Array:
    """Causal ragged attention of `q_tnh` `[tokens, q_heads, head_dim]` over the pages."""
    args = (q_tnh, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_seqs)
    if impl == "xla":
        return ragged_paged_attention_reference(*args, sm_scale=sm_scale, sliding_window=sliding_window)
    if impl in ("pallas", "pallas_interpret"):
        return ragged_paged_attention(
            *args, sm_scale=sm_scale, sliding_window=sliding_window, interpret=impl == "pallas_interpret"
        )
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
