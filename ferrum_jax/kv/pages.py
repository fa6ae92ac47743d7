"""The KV-page pytree: one K and one V array for the whole layer stack, `[kv_heads, num_layers *
num_pages, page_size, head_dim]`, layer l's page p at row `l * num_pages + p`. Allocated once,
donated into every step.

One array for all layers is what lets the step scan over the layers (one compiled layer body,
compile time independent of depth) while the KV stays in place: the scan carries the pool and
each layer reads and writes its own pages through page ids offset by `l * num_pages`. A leading
layer axis would instead need a per-layer slice of the pool, which XLA materialises as a copy in
front of an opaque attention kernel. Per layer the layout is what `pallas_kernels`
reads, so no kernel knows about layers and none relayouts anything per step.

The leading axis holds the KV heads a model shard attends with: all of them without tensor
parallelism, `num_kv_heads / tp` per shard when the heads split, and when tensor parallelism
exceeds the KV-head count one row per shard holding the one KV head that shard's query heads
read (see `sharding.kv_rows`), so a shard never slices a replicated pool.

Page 0 of every layer is reserved: padding tokens write there, so a padded slot never lands in a
live sequence's page. The allocator never hands it out.

The pages may hold a narrower dtype than the model computes in (`kv_cache_dtype`, fp8): the KV
write casts into it (`paged_attention.write_kv`) and every attention implementation casts what it
reads back to the query's dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KvPages:
    k: jax.Array
    v: jax.Array
    num_layers: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_pages(self) -> int:
        """Pages per layer."""
        return self.k.shape[1] // self.num_layers

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize


# `--kv-cache-dtype` -> the pages' dtype; "auto" is the model's. fp8 is e4m3 without scales
# (vLLM's default k_scale = v_scale = 1.0): K/V values far inside its +-448 range.
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn"}


def kv_cache_dtype(name: str, model_dtype) -> np.dtype:
    if name not in KV_CACHE_DTYPES:
        raise FerrumError.invalid_config(f"kv_cache_dtype {name!r}: expected one of {list(KV_CACHE_DTYPES)}")
    return jnp.dtype(KV_CACHE_DTYPES[name] or model_dtype)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """K plus V bytes one token occupies in ONE layer."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def abstract_kv_pages(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype, kv_rows: int, sharding=None
) -> KvPages:
    """The pages as ShapeDtypeStructs: what programs compile against."""
    page = jax.ShapeDtypeStruct((kv_rows, cfg.num_layers * num_pages, page_size, cfg.head_dim), dtype, sharding=sharding)
    return KvPages(k=page, v=page, num_layers=cfg.num_layers)


def allocate_kv_pages(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype, kv_rows: int, sharding=None
) -> KvPages:
    """Zeroed pages; `kv_rows` is the leading axis (see the module docstring)."""
    page = abstract_kv_pages(cfg, num_pages, page_size, dtype, kv_rows, sharding).k
    make = jax.jit(lambda: jnp.zeros(page.shape, page.dtype), out_shardings=sharding)
    return KvPages(k=make(), v=make(), num_layers=cfg.num_layers)


@jax.jit(donate_argnums=0)
def copy_page(kv: KvPages, src: jax.Array, dst: jax.Array) -> KvPages:
    """Page `src`'s K/V copied into page `dst`, in every layer (copy on write of a shared page)."""
    layers = jnp.arange(kv.num_layers, dtype=jnp.int32) * kv.num_pages
    return KvPages(
        k=kv.k.at[:, layers + dst].set(kv.k[:, layers + src]),
        v=kv.v.at[:, layers + dst].set(kv.v[:, layers + src]),
        num_layers=kv.num_layers,
    )
