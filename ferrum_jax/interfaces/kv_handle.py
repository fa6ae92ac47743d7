"""`KvCacheHandle`: an opaque reference to one sequence's KV cache.

Port of the Rust `KvCacheHandle` trait object. The executor owns the cache memory and
hands out a concrete subclass; the engine only keys on `cache_id` (e.g. for
`ModelExecutor.release_cache`) and reads `num_tokens`.
"""

from __future__ import annotations

import abc


class KvCacheHandle(abc.ABC):
    @property
    @abc.abstractmethod
    def cache_id(self) -> str:
        """Stable identifier of the cache, matching what `release_cache` expects."""

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int:
        """Number of token positions currently held in the cache."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_id={self.cache_id!r}, num_tokens={self.num_tokens})"
