"""The one attention dispatch point: write new K/V into the pages, then attend.

KV page layout (per layer, K and V separately): `[num_kv_heads, num_pages, page_size,
head_dim]`, identical to what `pallas_kernels.ragged_paged_attention` reads, so no relayout
ever happens per step. The leading kv-head axis is the one tensor parallelism shards.

`AttentionBackend.kind` is resolved by the executor from `attention="auto" | "xla" |
"pallas"`: `"xla"` is the blocked jnp path whose cost follows the real kv lengths (the CPU default), `"pallas"` the kernel for
the current backend, `"pallas_interpret"` the kernel in Pallas interpret mode (CPU tests).

Under tensor parallelism attention runs inside `shard_map`, one call per model shard on
that shard's query heads and its own KV heads (or, with replicated KV heads, the one KV
head its query heads read). A Pallas kernel is opaque to GSPMD, so it needs this; the
XLA path takes it too, because left to GSPMD the replicated-KV case all-gathers the
gathered pages twice per layer. Attention itself then needs no collective at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_xla

IMPLS = ("xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Static (hashable) choice of attention implementation, and the mesh for Pallas TP."""

    kind: str
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.kind not in IMPLS:
            raise ValueError(f"attention impl {self.kind!r} is not one of {IMPLS}")


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
    """Scatters `new_tkh` `[tokens, kv_heads, head_dim]` into the pages at `slot_mapping`.

    Indexed by (page, offset) on the pages as they are: flattening them to `[.., pages *
    page_size, ..]` first made XLA:CPU copy each layer's whole pool around the update."""
    page_size = pages_hpsd.shape[2]
    new_htd = jnp.swapaxes(new_tkh, 0, 1).astype(pages_hpsd.dtype)
    return pages_hpsd.at[:, slot_mapping // page_size, slot_mapping % page_size, :].set(new_htd)


def paged_attention(
    q_tnh: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    backend: AttentionBackend,
) -> jax.Array:
    """Causal ragged attention of `q_tnh` `[tokens, q_heads, head_dim]` over the pages."""
    args = (q_tnh, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_seqs)

    def attend(q, k, v, *rest):
        if backend.kind == "xla":
            return ragged_paged_attention_xla(q, k, v, *rest, sm_scale=sm_scale, sliding_window=sliding_window)
        return ragged_paged_attention(
            q, k, v, *rest, sm_scale=sm_scale, sliding_window=sliding_window,
            interpret=backend.kind == "pallas_interpret",
        )

    mesh = backend.mesh
    if mesh is None or mesh.shape["model"] == 1:
        return attend(*args)
    tp, num_kv = mesh.shape["model"], k_pages.shape[0]
    kv_sharded = num_kv % tp == 0

    def shard(q, k, v, *rest):
        if not kv_sharded:
            # Replicated KV heads: this shard's query heads all read KV head shard*num_kv//tp.
            head = jax.lax.axis_index("model") * num_kv // tp
            k = jax.lax.dynamic_slice_in_dim(k, head, 1, axis=0)
            v = jax.lax.dynamic_slice_in_dim(v, head, 1, axis=0)
        return attend(q, k, v, *rest)

    kv = P("model") if kv_sharded else P()
    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(P(None, "model"), kv, kv, P(), P(), P(), P()),
        out_specs=P(None, "model"),
        check_vma=False,
    )(*args)
