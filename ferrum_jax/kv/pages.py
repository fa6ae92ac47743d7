"""The KV-page pytree: one K and one V array for the whole layer stack, `[kv_heads, slots *
num_pages, page_size, head_dim]`: a page holds its tokens for `slots` layers (kv.layout), the
layer in slot s keeping page p at row `s * num_pages + p`; a model whose layers attend alike
has one slot per layer. Allocated once, donated into every step.

One array for all layers is what lets the step loop over the layers (one compiled layer body,
compile time independent of depth) while the KV stays in place: the loop carries the pool and
each layer reads and writes its own pages through page ids offset by `slot * num_pages`. A
leading layer axis would instead need a per-layer slice of the pool, which XLA materialises as
a copy in front of an opaque attention kernel. Per layer the layout is what `pallas_kernels`
reads, so no kernel knows about layers and none relayouts anything per step.

The leading axis holds the KV heads a model shard attends with: all of them without tensor
parallelism, `num_kv_heads / tp` per shard when the heads split, and when tensor parallelism
exceeds the KV-head count one row per shard holding the one KV head that shard's query heads
read (see `sharding.kv_rows`), so a shard never slices a replicated pool.

Page 0 of every slot is reserved: padding tokens write there, so a padded slot never lands in a
live sequence's page. The allocator never hands it out.

The pages may hold a narrower dtype than the model computes in (`kv_cache_dtype`, int8 or fp8).
Those carry scales, one per (layer, KV row) for K and for V (`k_scale`/`v_scale`, float32
`[kv_rows, num_layers]`, calibrated once at load: `kv.calibration`): the KV write stores
value / scale, rounded (int8) or saturated (both) into the narrow type, and attention multiplies
the queries by the K scale and its output by the V scale, so no attention implementation reads a
scale: each casts the pages it reads to the query's dtype, as for any narrow page.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KvPages:
    k: jax.Array
    v: jax.Array
    slots: int = dataclasses.field(metadata=dict(static=True))  # layers per page (kv.layout)
    k_scale: jax.Array | None = None  # [kv_rows, num_layers] float32, narrow pages only
    v_scale: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        """Pages of the pool (each holding `slots` layers)."""
        return self.k.shape[1] // self.slots

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize


# `--kv-cache-dtype` -> the pages' dtype; "auto" is the model's.
KV_CACHE_DTYPES = {"auto": None, "int8": "int8", "fp8": "float8_e4m3fn"}


def kv_cache_dtype(name: str, model_dtype) -> np.dtype:
    if name not in KV_CACHE_DTYPES:
        raise FerrumError.invalid_config(f"kv_cache_dtype {name!r}: expected one of {list(KV_CACHE_DTYPES)}")
    return jnp.dtype(KV_CACHE_DTYPES[name] or model_dtype)


def kv_scaled(dtype) -> bool:
    """Whether pages of `dtype` carry scales (the narrow ones: int8, fp8)."""
    return jnp.dtype(dtype).itemsize == 1


def kv_max(dtype) -> float:
    """The largest magnitude a scaled page stores: what the calibrated maximum maps to."""
    dtype = jnp.dtype(dtype)
    return float(jnp.iinfo(dtype).max if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).max)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """K plus V bytes one token occupies in ONE layer."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def abstract_kv_pages(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype, kv_rows: int, sharding=None, scale_sharding=None
) -> KvPages:
    """The pages as ShapeDtypeStructs: what programs compile against."""
    slots = kv_layout(cfg).slots
    page = jax.ShapeDtypeStruct((kv_rows, slots * num_pages, page_size, cfg.head_dim), dtype, sharding=sharding)
    scale = None
    if kv_scaled(dtype):
        scale = jax.ShapeDtypeStruct((kv_rows, cfg.num_layers), jnp.float32, sharding=scale_sharding)
    return KvPages(k=page, v=page, slots=slots, k_scale=scale, v_scale=scale)


def allocate_kv_pages(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype, kv_rows: int, sharding=None, scale_sharding=None,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> KvPages:
    """Zeroed pages; `kv_rows` is the leading axis (see the module docstring). Narrow pages take
    `scales` (K, V; `kv.calibration`), which they require."""
    abstract = abstract_kv_pages(cfg, num_pages, page_size, dtype, kv_rows, sharding, scale_sharding)
    if (abstract.k_scale is None) != (scales is None):
        raise FerrumError.internal(f"KV pages of {jnp.dtype(dtype).name} {'need' if scales is None else 'take no'} scales")
    page = abstract.k
    make = jax.jit(lambda: jnp.zeros(page.shape, page.dtype), out_shardings=sharding)
    k_scale, v_scale = (None, None) if scales is None else jax.device_put(scales, scale_sharding)
    return KvPages(k=make(), v=make(), slots=abstract.slots, k_scale=k_scale, v_scale=v_scale)


@jax.jit(donate_argnums=0)
def copy_page(kv: KvPages, src: jax.Array, dst: jax.Array) -> KvPages:
    """Page `src`'s K/V copied into page `dst`, in every slot (copy on write of a shared page)."""
    slot_rows = jnp.arange(kv.slots, dtype=jnp.int32) * kv.num_pages
    return dataclasses.replace(
        kv,
        k=kv.k.at[:, slot_rows + dst].set(kv.k[:, slot_rows + src]),
        v=kv.v.at[:, slot_rows + dst].set(kv.v[:, slot_rows + src]),
    )
