"""The one attention dispatch point: write new K/V into the pages, then attend.

KV pages (see `ferrum_jax.kv.pages`): `[kv_rows, slots * num_pages, page_size, head_dim]` for K
and V, the layer in slot s at rows `s * num_pages ...`. `for_layer` picks a layer's KV group's
page table and slot mapping (kv.layout) and offsets them to its slot, so each layer is the
`[kv_heads, pages, page_size, head_dim]` pool `pallas_kernels.ragged_paged_attention` reads, with
no per-layer slice or relayout of the pool.

`AttentionBackend.kind` is resolved by the executor from `attention="auto" | "xla" |
"pallas"`: `"xla"` is the blocked jnp path whose cost follows the real kv lengths (the CPU
default; on XLA:CPU its decode tokens go to a C++ custom call that reads the pages in place),
`"pallas"` the kernel of the platform the mesh's devices belong to (the Mosaic kernel for TPU,
Triton for GPU), `"pallas_interpret"` the kernel in Pallas interpret mode (CPU tests).

Under tensor parallelism the KV write and attention run inside `shard_map`, one call per model
shard on that shard's query heads and its own rows of the pages: its KV heads, or with
replicated KV heads the one head its query heads read, which the shard picks out of the
(replicated) new K/V before writing. A Pallas kernel is opaque to GSPMD, so it needs this; the
XLA path takes it too, because left to GSPMD the replicated-KV case all-gathers the gathered
pages twice per layer. Attention itself then needs no collective at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_xla
from pallas_kernels.ragged_paged_attention.cpu_kernel import target_name as cpu_kernel_target

from ferrum_jax.kv.pages import kv_max

IMPLS = ("xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Static (hashable) choice of attention implementation, the mesh for Pallas TP, and whether
    the mesh splits expert stacks by expert (models.sharding's expert parallelism)."""

    kind: str
    mesh: Mesh | None = None
    expert_parallel: bool = False

    def __post_init__(self):
        if self.kind not in IMPLS:
            raise ValueError(f"attention impl {self.kind!r} is not one of {IMPLS}")

    @property
    def platform(self) -> str:
        """What the step compiles for: the mesh's devices (compile-only TPU/GPU devices on a CPU
        host in `ferrum_jax.aot`), else the default backend."""
        return jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform

    @property
    def grouped_kernel(self) -> str | None:
        """Whose Pallas kernel ("gpu", "tpu") grouped quantized matmuls (int4, grouped int8) read
        their codes in (models.grouped_kernels): the platform's with the Pallas kernels, the TPU
        one in the interpreter with "pallas_interpret" on CPU; None with the XLA path."""
        if self.kind == "pallas_interpret":
            return "gpu" if self.platform == "gpu" else "tpu"
        return self.platform if self.kind == "pallas" and self.platform in ("gpu", "tpu") else None

    @property
    def cpu_kernel(self) -> str | None:
        """FFI target of the CPU kernel the XLA path hands decode tokens to on XLA:CPU (built and
        registered on first use), None elsewhere or where it cannot be built."""
        if self.kind != "xla" or self.platform != "cpu":
            return None
        return cpu_kernel_target()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step ragged layout shared by every layer.

    slot_mapping `[groups, tokens]`: per KV group (kv.layout) the flat slot (page * page_size +
    offset) each new token's K/V goes to; padding tokens point into the reserved page 0.
    cu_q_lens `[seqs + 1]`, kv_lens `[seqs]` (including the new tokens),
    page_table `[groups, seqs, pages_per_seq]` (a sliding-window group's pages its window has
    passed are 0), num_seqs `[]` (sequences past it are padding). `for_layer` makes the
    one-group `[tokens]` / `[seqs, pages_per_seq]` form the kernels read.
    """

    slot_mapping: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    num_seqs: jax.Array


def for_layer(meta: AttentionMetadata, group: int, slot: jax.Array, num_pages: int, page_size: int) -> AttentionMetadata:
    """`meta` addressing the pages of the layer in KV group `group` (static), slot `slot` of the
    stacked pool (`num_pages` pages per slot)."""
    first_page = slot * num_pages
    return dataclasses.replace(
        meta, page_table=meta.page_table[group] + first_page, slot_mapping=meta.slot_mapping[group] + first_page * page_size
    )


def write_kv(pages_hpsd: jax.Array, new_tkh: jax.Array, slot_mapping: jax.Array, scale_k: jax.Array | None = None) -> jax.Array:
    """Scatters `new_tkh` `[tokens, kv_heads, head_dim]` into the pages at `slot_mapping`, in place;
    into narrow pages as `new / scale_k` (`[kv_heads]`, see kv.pages), rounded for int8 and
    saturated at the type's largest value (fp8 has no infinity: out of range would be NaN).

    Every (token, head) is its own scatter index into (head, page, offset), so the update window
    is one `head_dim` row and every indexed dimension is major to it: the scatter works on the
    pages in their own layout. Indexing only (page, offset) and carrying the heads in the window
    made XLA:TPU lay the whole pool out heads-minor for the scatter and back for the attention
    kernel, two copies of the pool per layer (8.6 GB of temporaries for Llama-3-8B on v6e,
    `python -m ferrum_jax.aot`); flattening (page, offset) made XLA:CPU copy the pool too."""
    heads, _, page_size, _ = pages_hpsd.shape
    tokens = new_tkh.shape[0]
    head_tk = jnp.broadcast_to(jnp.arange(heads, dtype=slot_mapping.dtype)[None, :], (tokens, heads))
    page_tk = jnp.broadcast_to((slot_mapping // page_size)[:, None], (tokens, heads))
    offset_tk = jnp.broadcast_to((slot_mapping % page_size)[:, None], (tokens, heads))
    if scale_k is not None:
        limit = kv_max(pages_hpsd.dtype)
        new_tkh = jnp.clip(new_tkh.astype(jnp.float32) / scale_k[None, :, None], -limit, limit)
        if jnp.issubdtype(pages_hpsd.dtype, jnp.integer):
            new_tkh = jnp.round(new_tkh)
    return pages_hpsd.at[head_tk, page_tk, offset_tk, :].set(new_tkh.astype(pages_hpsd.dtype))


def write_and_attend(
    q_tnh: jax.Array,
    k_tkh: jax.Array,
    v_tkh: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    backend: AttentionBackend,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes the new `k_tkh`/`v_tkh` `[tokens, kv_heads, head_dim]` at `meta.slot_mapping`, then
    runs causal ragged attention of `q_tnh` `[tokens, q_heads, head_dim]` over the pages `meta`
    addresses. Returns (`[tokens, q_heads, head_dim]`, k_pages, v_pages).

    k_scale / v_scale `[kv_rows]`: this layer's scales of narrow pages (kv.pages), else None.
    Pages hold k / k_scale, so q . k = (q * k_scale) . pages; and sum p v = v_scale * sum p pages.
    soft_cap: scores become soft_cap * tanh(scores / soft_cap) before the softmax (Gemma 2)."""
    rest = (meta.slot_mapping, meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_seqs)
    scales = () if k_scale is None else (k_scale, v_scale)

    def run(q, k_new, v_new, k, v, slot_mapping, kv_lens, page_table, cu_q_lens, num_seqs, *scales):
        k_scale_k, v_scale_k = scales or (None, None)
        k = write_kv(k, k_new, slot_mapping, k_scale_k)
        v = write_kv(v, v_new, slot_mapping, v_scale_k)
        if scales:
            group = q.shape[1] // k.shape[0]
            q = (q * jnp.repeat(k_scale_k, group)[None, :, None]).astype(q.dtype)
        args = (q, k, v, kv_lens, page_table, cu_q_lens, num_seqs)
        if backend.kind == "xla":
            out = ragged_paged_attention_xla(*args, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                             cpu_kernel=backend.cpu_kernel is not None)
        else:
            out = ragged_paged_attention(
                *args, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                interpret=backend.kind == "pallas_interpret", platform=backend.platform,
            )
        if scales:
            out = (out * jnp.repeat(v_scale_k, group)[None, :, None]).astype(out.dtype)
        return out, k, v

    mesh = backend.mesh
    if mesh is None or mesh.shape["model"] == 1:
        return run(q_tnh, k_tkh, v_tkh, k_pages, v_pages, *rest, *scales)
    tp, num_kv = mesh.shape["model"], k_tkh.shape[1]
    kv_sharded = num_kv % tp == 0

    def shard(q, k_new, v_new, *pages_and_rest):
        if not kv_sharded:
            # Replicated KV heads: this shard's query heads all read KV head shard*num_kv//tp,
            # the one its row of the pages holds.
            head = jax.lax.axis_index("model") * num_kv // tp
            k_new = jax.lax.dynamic_slice_in_dim(k_new, head, 1, axis=1)
            v_new = jax.lax.dynamic_slice_in_dim(v_new, head, 1, axis=1)
        return run(q, k_new, v_new, *pages_and_rest)

    heads = P(None, "model")
    new_kv = heads if kv_sharded else P()
    pages = P("model")
    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(heads, new_kv, new_kv, pages, pages, P(), P(), P(), P(), P(), *(pages for _ in scales)),
        out_specs=(heads, pages, pages),
        check_vma=False,
    )(q_tnh, k_tkh, v_tkh, k_pages, v_pages, *rest, *scales)
