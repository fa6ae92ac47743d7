"""Automatic prefix caching: which KV pages hold which token prefix (vLLM's scheme).

The K/V at a position depend on every token before it, so a full page is named by a hash
chain: a page's name is sha256(its parent page's name, its token ids), and the first page's
parent is a root made from the sequence's cache salt (anything else that changes the KV
joins the root). Equal names mean equal prefixes, so a page named once can serve every
later sequence whose tokens start the same way: `match` walks a new prompt's pages from the
root while their names are known, and the sequence maps those pages instead of computing
them. Only full pages get names, so a partial page is never shared; a sequence only ever
writes past its own length, so it never writes a page it shares.

Every KV group (kv.layout) names its own pages: a name says which tokens a page holds, the
group which layers. Pages keep their names while free (the allocator's cached pages) and lose
them when evicted for reuse, or when the one sequence holding them truncates into them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from ferrum_jax.kv.allocator import PageAllocator


def root_name(cache_salt: str | None) -> bytes:
    return hashlib.sha256(b"ferrum-prefix\0" + (cache_salt or "").encode()).digest()


def page_name(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(token_ids, np.int32).tobytes()).digest()


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
    """The cached pages a token sequence starts with: per KV group its page table over the
    matched pages (0 where a sliding window has passed), and the pages' names."""

    pages: tuple[tuple[int, ...], ...]
    names: tuple[bytes, ...]
    root: bytes
    num_tokens: int  # tokens the pages hold
    num_queried: int  # tokens the lookup was asked about
    num_evictable: int  # of the pages, those free now: holding them takes them off the free count

    @property
    def num_covered(self) -> int:
        """Page-table entries the match fills, over all groups (held or passed by a window)."""
        return len(self.pages) * len(self.names)


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, windows: tuple[int | None, ...] = (None,),
                 enabled: bool = True):
        """windows: per KV group (kv.layout) its sliding window, None for global layers."""
        self.allocator = allocator
        self.page_size = page_size
        self.windows = windows
        self.enabled = enabled
        self._page_of: dict[tuple[int, bytes], int] = {}  # (group, name) -> page
        self._name_of: dict[int, tuple[int, bytes]] = {}
        self.queried_tokens = 0  # vLLM's prefix-cache counters, in tokens
        self.hit_tokens = 0
        allocator.on_evict = self._evicted

    @property
    def num_pages(self) -> int:
        """Pages holding a named prefix, held by a sequence or free."""
        return len(self._page_of)

    def first_read(self, group: int, num_tokens: int) -> int:
        """The first page a query at position `num_tokens` reads in `group`: 0 for a global
        group, else the page of the oldest position its window reaches."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_tokens - window + 1) // self.page_size

    def match(self, token_ids: Sequence[int], cache_salt: str | None = None) -> PrefixMatch:
        """The longest run of cached pages `token_ids` starts with, leaving at least its last
        token uncovered (a step must compute it to produce logits). A global group must hold
        every matched page, a sliding-window group those its window still reads from the
        first uncovered token on: its older pages may be gone."""
        root = root_name(cache_salt)
        names: list[bytes] = []
        if self.enabled:
            parent = root
            for start in range(0, len(token_ids) - self.page_size, self.page_size):
                name = page_name(parent, token_ids[start : start + self.page_size])
                if any(w is None and (g, name) not in self._page_of for g, w in enumerate(self.windows)):
                    break
                names.append(name)
                parent = name
        m = len(names)
        while m and not all(
            (g, names[j]) in self._page_of
            for g in range(len(self.windows))
            for j in range(self.first_read(g, m * self.page_size), m)
        ):
            m -= 1
        names = names[:m]
        pages = tuple(
            tuple(self._page_of[(g, n)] if j >= self.first_read(g, m * self.page_size) else 0 for j, n in enumerate(names))
            for g in range(len(self.windows))
        )
        evictable = sum(self.allocator.is_evictable(p) for table in pages for p in table if p)
        return PrefixMatch(pages, tuple(names), root, m * self.page_size, len(token_ids), evictable)

    def is_current(self, match: PrefixMatch) -> bool:
        return all(
            self._page_of.get((g, name)) == page
            for g, table in enumerate(match.pages)
            for name, page in zip(match.names, table)
            if page
        )

    def record(self, match: PrefixMatch) -> None:
        if not self.enabled:
            return
        self.queried_tokens += match.num_queried
        self.hit_tokens += match.num_tokens

    def register(self, group: int, page: int, name: bytes) -> None:
        """Names a page of `group` whose KV now holds the prefix `name`; a prefix already cached
        in another page (two sequences computed it side by side) keeps that page."""
        if self.enabled and (group, name) not in self._page_of and page not in self._name_of:
            self._page_of[(group, name)] = page
            self._name_of[page] = (group, name)

    def is_named(self, page: int) -> bool:
        return page in self._name_of

    def forget(self, page: int) -> None:
        """The page's KV stops matching its name (its holder overwrites it)."""
        key = self._name_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
            self.allocator.forget(page)

    def _evicted(self, page: int) -> None:
        del self._page_of[self._name_of.pop(page)]
