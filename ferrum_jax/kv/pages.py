"""The KV-page pytree: per layer one K and one V array `[kv_heads, num_pages, page_size,
head_dim]` (the layout `pallas_kernels` reads). Allocated once, donated into every step.

Page 0 is reserved: padding tokens write there, so a padded slot never lands in a live
sequence's page. The allocator never hands it out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KvPages:
    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """K plus V bytes one token occupies in ONE layer."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def allocate_kv_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> KvPages:
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KvPages(k=[make() for _ in range(cfg.num_layers)], v=[make() for _ in range(cfg.num_layers)])
