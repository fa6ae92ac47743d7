"""Host-side bookkeeping of live sequences: their pages, their lengths, their handles.

The only place pages are reserved or returned. Every mutation first checks what it needs,
so a failed request (bad handle, too long, pool exhausted) changes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.kv.allocator import PageAllocator


@dataclasses.dataclass
class Sequence:
    cache_id: str
    pages: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    released: bool = False


class PagedKvCacheHandle(KvCacheHandle):
    """A live view of one sequence: `num_tokens` follows decode and truncate."""

    def __init__(self, seq: Sequence):
        self._seq = seq

    @property
    def cache_id(self) -> str:
        return self._seq.cache_id

    @property
    def num_tokens(self) -> int:
        return self._seq.num_tokens

    @property
    def page_ids(self) -> tuple[int, ...]:
        return tuple(self._seq.pages)


class SequenceTable:
    def __init__(self, allocator: PageAllocator, page_size: int, max_sequence_length: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_sequence_length = max_sequence_length
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._seqs)

    def create(self, cache_id: str | None = None) -> Sequence:
        cache_id = cache_id or f"seq-{next(self._ids)}"
        if cache_id in self._seqs:
            raise FerrumError.invalid_request(f"kv cache id {cache_id!r} is already live")
        seq = Sequence(cache_id)
        self._seqs[cache_id] = seq
        return seq

    def handle(self, seq: Sequence) -> PagedKvCacheHandle:
        return PagedKvCacheHandle(seq)

    def lookup(self, handle: KvCacheHandle | None) -> Sequence:
        if handle is None:
            raise FerrumError.invalid_request("kv_cache handle is required")
        seq = self._seqs.get(handle.cache_id)
        if seq is None:
            raise FerrumError.invalid_request(f"unknown or released kv cache {handle.cache_id!r}")
        return seq

    def check_room(self, seq: Sequence, new_tokens: int) -> None:
        total = seq.num_tokens + new_tokens
        if total > self.max_sequence_length:
            raise FerrumError.invalid_request(
                f"sequence {seq.cache_id!r} would hold {total} tokens "
                f"({seq.num_tokens} cached + {new_tokens} new), over max_sequence_length={self.max_sequence_length}"
            )

    def pages_needed(self, seq: Sequence, total_tokens: int) -> int:
        return max(0, -(-total_tokens // self.page_size) - len(seq.pages))

    def reserve(self, demands: list[tuple[Sequence, int]]) -> None:
        """Grows each (sequence, total tokens) to enough pages; all or nothing."""
        counts = [self.pages_needed(seq, total) for seq, total in demands]
        need = sum(counts)
        if need > self.allocator.num_free:
            raise FerrumError.resource_exhausted(
                f"KV cache exhausted: {need} pages needed, {self.allocator.num_free} of {self.allocator.total} free"
            )
        for (seq, _), n in zip(demands, counts):
            seq.pages.extend(self.allocator.allocate(n))

    def truncate(self, seq: Sequence, new_len: int) -> None:
        if not 0 <= new_len <= seq.num_tokens:
            raise FerrumError.invalid_request(
                f"truncate_kv to {new_len} tokens: sequence {seq.cache_id!r} holds {seq.num_tokens}"
            )
        keep = -(-new_len // self.page_size)
        self.allocator.free(seq.pages[keep:])
        del seq.pages[keep:]
        seq.num_tokens = new_len

    def release(self, cache_id: str) -> bool:
        seq = self._seqs.pop(cache_id, None)
        if seq is None:
            return False
        self.allocator.free(seq.pages)
        seq.pages.clear()
        seq.released = True
        return True

    def release_all(self) -> None:
        for cache_id in list(self._seqs):
            self.release(cache_id)
