"""Host-side page allocator with reference counts and exact accounting.

Pages `1 .. num_pages-1` are allocatable; page 0 is the padding target. A page is held by
every sequence whose page table lists it (a prefix shared between sequences is one page
with several holders) and is free when nobody holds it. Free pages are of two kinds:
empty ones, and cached ones whose KV a later request may still reuse (see
`prefix_cache.py`). Allocation takes empty pages first, then evicts the least recently
freed cached page, telling `on_evict` so the page's name is forgotten before it is
overwritten. Allocation is all-or-nothing, so a failed request never leaks pages.
"""

from __future__ import annotations

import collections
from typing import Callable

from ferrum_jax.interfaces.errors import FerrumError


class PageAllocator:
    RESERVED = 1

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise FerrumError.invalid_config(f"num_pages={num_pages}: need at least 2 (page 0 is reserved)")
        self.num_pages = num_pages
        # Popping from the end hands out low page ids first, which keeps tests readable.
        self._empty = list(range(num_pages - 1, 0, -1))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # eviction order
        self._refs: dict[int, int] = {}
        self.on_evict: Callable[[int], None] = lambda page: None

    @property
    def total(self) -> int:
        """Allocatable pages (the reserved page excluded)."""
        return self.num_pages - self.RESERVED

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: empty plus evictable cached ones."""
        return len(self._empty) + len(self._cached)

    @property
    def num_empty(self) -> int:
        return len(self._empty)

    @property
    def num_evictable(self) -> int:
        """Free pages that still hold reusable KV."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Pages at least one sequence holds."""
        return len(self._refs)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def is_evictable(self, page: int) -> bool:
        return page in self._cached

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise FerrumError.resource_exhausted(
                f"KV cache exhausted: {n} pages requested, {self.num_free} of {self.total} free"
            )
        pages = []
        for _ in range(n):
            if self._empty:
                page = self._empty.pop()
            else:
                page, _ = self._cached.popitem(last=False)
                self.on_evict(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def hold(self, page: int) -> None:
        """One more holder of an allocated or cached page (a prefix-cache hit)."""
        if page in self._cached:
            del self._cached[page]
        elif page not in self._refs:
            raise FerrumError.internal(f"page {page} is held but neither allocated nor cached")
        self._refs[page] = self._refs.get(page, 0) + 1

    def free(self, pages: list[int], keep: Callable[[int], bool] = lambda page: False) -> None:
        """Drops one holder of each page. A page nobody holds any more becomes cached (the
        most recently freed, last to be evicted) if `keep(page)`, else empty. Pages are given
        in eviction order: a sequence frees its tail first, so its head, the part most likely
        shared, survives longest."""
        for p in pages:
            refs = self._refs.get(p, 0)
            if refs == 0:
                raise FerrumError.internal(f"page {p} freed but not allocated")
            if refs > 1:
                self._refs[p] = refs - 1
                continue
            del self._refs[p]
            if keep(p):
                self._cached[p] = None
            else:
                self._empty.append(p)

    def forget(self, page: int) -> None:
        """A free cached page whose KV is no longer reusable becomes empty."""
        if page in self._cached:
            del self._cached[page]
            self._empty.append(page)
