"""KV state: the device-side page pytree and the host-side page allocator."""

from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.kv.pages import KvPages, allocate_kv_pages, kv_bytes_per_token

__all__ = ["KvPages", "PageAllocator", "allocate_kv_pages", "kv_bytes_per_token"]
