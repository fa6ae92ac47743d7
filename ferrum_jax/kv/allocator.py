"""Host-side page allocator with exact accounting.

Pages `1 .. num_pages-1` are allocatable; page 0 is the padding target. Allocation is
all-or-nothing, so a failed request never leaks pages.
"""

from __future__ import annotations

from ferrum_jax.interfaces.errors import FerrumError


class PageAllocator:
    RESERVED = 1

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise FerrumError.invalid_config(f"num_pages={num_pages}: need at least 2 (page 0 is reserved)")
        self.num_pages = num_pages
        # Popping from the end hands out low page ids first, which keeps tests readable.
        self._free = list(range(num_pages - 1, 0, -1))
        self._used: set[int] = set()

    @property
    def total(self) -> int:
        """Allocatable pages (the reserved page excluded)."""
        return self.num_pages - self.RESERVED

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise FerrumError.resource_exhausted(
                f"KV cache exhausted: {n} pages requested, {len(self._free)} of {self.total} free"
            )
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise FerrumError.internal(f"page {p} freed but not allocated")
            self._used.remove(p)
            self._free.append(p)
