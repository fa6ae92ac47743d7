"""Host-side bookkeeping of live sequences: their pages, their lengths, their handles.

The only place pages are reserved or returned. Every mutation first checks what it needs,
so a failed request (bad handle, too long, pool exhausted) changes nothing.

Each sequence also keeps its token ids so that its full pages get their prefix-cache names
(`kv/prefix_cache.py`) as soon as their tokens are known: a token sampled on device and fed
to the next step is unknown on the host until its step is read (`resolve`).
"""

from __future__ import annotations

import dataclasses
import itertools

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.kv.prefix_cache import PrefixCache, PrefixMatch, page_name, root_name

UNKNOWN = -1  # a token id the host does not know yet


@dataclasses.dataclass
class Sequence:
    cache_id: str
    pages: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    released: bool = False
    token_ids: list[int] = dataclasses.field(default_factory=list)
    names: list[bytes] = dataclasses.field(default_factory=list)  # of its first len(names) pages
    root: bytes = root_name(None)
    # False once a caller placed tokens at positions of its own: the KV then no longer
    # follows from the token ids alone, so no further page of it may be named.
    nameable: bool = True


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
    def __init__(self, allocator: PageAllocator, page_size: int, max_sequence_length: int, prefix_caching: bool = True):
        self.allocator = allocator
        self.cache = PrefixCache(allocator, page_size, enabled=prefix_caching)
        self.page_size = page_size
        self.max_sequence_length = max_sequence_length
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._seqs)

    def create(self, cache_id: str | None = None, prefix: PrefixMatch | None = None) -> Sequence:
        """A new sequence; with `prefix` (a `PrefixCache.match` of its tokens) it starts out
        holding those cached pages and their tokens."""
        cache_id = cache_id or f"seq-{next(self._ids)}"
        if cache_id in self._seqs:
            raise FerrumError.invalid_request(f"kv cache id {cache_id!r} is already live")
        seq = Sequence(cache_id)
        if prefix is not None:
            if not self.cache.is_current(prefix):
                raise FerrumError.internal("a prefix match was used after its pages changed")
            for page in prefix.pages:
                self.allocator.hold(page)
            seq.pages, seq.names, seq.root = list(prefix.pages), list(prefix.names), prefix.root
            seq.num_tokens = prefix.num_tokens
            seq.token_ids = [UNKNOWN] * prefix.num_tokens  # only the names are needed from here on
            self.cache.record(prefix)
        self._seqs[cache_id] = seq
        return seq

    def append(self, seq: Sequence, token_ids) -> None:
        """`token_ids` (UNKNOWN where not known yet) now have their KV written."""
        seq.num_tokens += len(token_ids)
        if self.cache.enabled:  # the ids only serve to name pages
            seq.token_ids.extend(int(t) for t in token_ids)
            self._name_pages(seq)

    def resolve(self, seq: Sequence, position: int, token_id: int) -> None:
        """The token at `position`, appended while unknown, turned out to be `token_id`."""
        if not seq.released and position < len(seq.token_ids) and seq.token_ids[position] == UNKNOWN:
            seq.token_ids[position] = token_id
            self._name_pages(seq)

    def _name_pages(self, seq: Sequence) -> None:
        if not self.cache.enabled:
            return
        ps = self.page_size
        while seq.nameable and (len(seq.names) + 1) * ps <= seq.num_tokens:
            i = len(seq.names)
            tokens = seq.token_ids[i * ps : (i + 1) * ps]
            if UNKNOWN in tokens:
                return
            name = page_name(seq.names[-1] if seq.names else seq.root, tokens)
            seq.names.append(name)
            self.cache.register(seq.pages[i], name)

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

    def truncate(self, seq: Sequence, new_len: int) -> tuple[int, int] | None:
        """Drops the tokens from `new_len` on. Returns (shared page, its private copy) when
        the cut lands inside a page other sequences hold too: the caller copies the KV over
        before anything writes the rest of that page (copy on write)."""
        if not 0 <= new_len <= seq.num_tokens:
            raise FerrumError.invalid_request(
                f"truncate_kv to {new_len} tokens: sequence {seq.cache_id!r} holds {seq.num_tokens}"
            )
        keep = -(-new_len // self.page_size)
        copy = None
        if new_len % self.page_size and keep <= len(seq.names):
            page = seq.pages[keep - 1]  # was full and named; its tail will be rewritten
            if self.allocator.refcount(page) > 1:
                if self.allocator.num_free == 0:
                    raise FerrumError.resource_exhausted(
                        f"truncate_kv to {new_len} tokens needs a page to copy shared page {page} into; none is free"
                    )
                (private,) = self.allocator.allocate(1)
                self.allocator.free([page])
                seq.pages[keep - 1] = private
                copy = (page, private)
            else:
                self.cache.forget(page)
        self._free(seq.pages[keep:])
        del seq.pages[keep:]
        del seq.token_ids[new_len:]
        del seq.names[new_len // self.page_size :]
        seq.num_tokens = new_len
        return copy

    def release(self, cache_id: str) -> bool:
        seq = self._seqs.pop(cache_id, None)
        if seq is None:
            return False
        self._free(seq.pages)
        seq.pages.clear()
        seq.released = True
        return True

    def _free(self, pages: list[int]) -> None:
        self.allocator.free(pages[::-1], keep=self.cache.is_named)

    def release_all(self) -> None:
        for cache_id in list(self._seqs):
            self.release(cache_id)
