"""Host-side bookkeeping of live sequences: their pages, their lengths, their handles.

The only place pages are reserved or returned. Every mutation first checks what it needs,
so a failed request (bad handle, too long, pool exhausted) changes nothing.

A sequence has a page table per KV group (kv.layout). A sliding-window group gives back, before
each step, the pages no query from the step's first token on can read (its window has passed
them), and its table keeps 0 there; so a long sequence holds only about `window` positions of
its local layers.

Each sequence also keeps its token ids so that its full pages get their prefix-cache names
(`kv/prefix_cache.py`) as soon as their tokens are known: a token sampled on device and fed
to the next step is unknown on the host until its step is read (`resolve`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.interfaces.kv_handle import KvCacheHandle
from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.kv.prefix_cache import PrefixCache, PrefixMatch, page_name, root_name

UNKNOWN = -1  # a token id the host does not know yet


PASSED = 0  # a page-table entry whose page a sliding window has passed (the padding page)


@dataclasses.dataclass
class Sequence:
    cache_id: str
    tables: list[list[int]]  # per KV group, the page of each of its first pages
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
    def page_tables(self) -> tuple[tuple[int, ...], ...]:
        """Per KV group its pages (kv.layout; PASSED where a sliding window has passed them)."""
        return tuple(tuple(t) for t in self._seq.tables)


class SequenceTable:
    def __init__(self, allocator: PageAllocator, page_size: int, max_sequence_length: int, prefix_caching: bool = True,
                 windows: tuple[int | None, ...] = (None,)):
        """windows: per KV group (kv.layout) its sliding window, None for global layers."""
        self.allocator = allocator
        self.cache = PrefixCache(allocator, page_size, windows, enabled=prefix_caching)
        self.windows = windows
        self.page_size = page_size
        self.max_sequence_length = max_sequence_length
        # Tokens a caller may still truncate from a sequence's end (speculative drafts and the
        # token before them): windows keep what a query that far back reads.
        self.rollback_tokens = 0
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
        seq = Sequence(cache_id, [[] for _ in self.windows])
        if prefix is not None:
            if not self.cache.is_current(prefix):
                raise FerrumError.internal("a prefix match was used after its pages changed")
            for table in prefix.pages:
                for page in table:
                    if page != PASSED:
                        self.allocator.hold(page)
            seq.tables, seq.names, seq.root = [list(t) for t in prefix.pages], list(prefix.names), prefix.root
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
            for group, table in enumerate(seq.tables):
                if table[i] != PASSED:
                    self.cache.register(group, table[i], name)

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

    def _passed(self, seq: Sequence, group: int) -> range:
        """Indices of the held pages of `group` no query from the sequence's next token on reads
        (from `rollback_tokens` before it, where the caller may truncate to)."""
        table = seq.tables[group]
        first = max(0, seq.num_tokens - self.rollback_tokens)
        return range(_first_held(table), min(self.cache.first_read(group, first), len(table)))

    def pages_needed(self, seq: Sequence, total_tokens: int) -> int:
        """Pages the sequence must gain to hold `total_tokens`, less those its windows give back
        first (negative when it gives back more)."""
        pages = -(-total_tokens // self.page_size)
        return sum(max(0, pages - len(t)) - len(self._passed(seq, g)) for g, t in enumerate(seq.tables))

    def reserve(self, demands: list[tuple[Sequence, int]]) -> None:
        """Grows each (sequence, total tokens) to enough pages, after giving back the pages its
        windows have passed; all or nothing."""
        need = sum(self.pages_needed(seq, total) for seq, total in demands)
        if need > self.allocator.num_free:
            raise FerrumError.resource_exhausted(
                f"KV cache exhausted: {need} pages needed, {self.allocator.num_free} of {self.allocator.total} free"
            )
        for seq, _ in demands:
            self.give_back_passed(seq)
        pages = [-(-total // self.page_size) for _, total in demands]
        for (seq, _), n in zip(demands, pages):
            for table in seq.tables:
                table.extend(self.allocator.allocate(max(0, n - len(table))))

    def give_back_passed(self, seq: Sequence) -> None:
        """Frees the pages of the sequence's sliding-window groups its next query cannot read."""
        for group, table in enumerate(seq.tables):
            passed = self._passed(seq, group)
            self._free([table[j] for j in passed])
            for j in passed:
                table[j] = PASSED

    def truncate(self, seq: Sequence, new_len: int) -> list[tuple[int, int]]:
        """Drops the tokens from `new_len` on. Returns the (shared page, its private copy) pairs
        of the groups whose page the cut lands inside while other sequences hold it too: the
        caller copies the KV over before anything writes the rest of that page (copy on
        write)."""
        if not 0 <= new_len <= seq.num_tokens:
            raise FerrumError.invalid_request(
                f"truncate_kv to {new_len} tokens: sequence {seq.cache_id!r} holds {seq.num_tokens}"
            )
        keep = -(-new_len // self.page_size)
        for group, table in enumerate(seq.tables):
            held = _first_held(table)
            if min(held, keep) > self.cache.first_read(group, new_len):
                raise FerrumError.invalid_request(
                    f"truncate_kv to {new_len} tokens: sequence {seq.cache_id!r} keeps the KV of its layers with "
                    f"sliding window {self.windows[group]} from position {held * self.page_size} on, and the next "
                    f"token would read from position {max(0, new_len - self.windows[group] + 1)}"
                )
        # A cut inside a full, named page: its tail will be rewritten, so a page other sequences
        # share is copied first and a private one loses its name.
        cut = new_len % self.page_size != 0 and keep <= len(seq.names)
        cut_pages = [table[keep - 1] for table in seq.tables] if cut else []
        shared = [g for g, page in enumerate(cut_pages) if self.allocator.refcount(page) > 1]
        if len(shared) > self.allocator.num_free:
            raise FerrumError.resource_exhausted(
                f"truncate_kv to {new_len} tokens needs {len(shared)} pages to copy shared pages into; "
                f"{self.allocator.num_free} are free"
            )
        for g, page in enumerate(cut_pages):
            if g not in shared:
                self.cache.forget(page)
        copies = []
        for group in shared:
            page = seq.tables[group][keep - 1]
            (private,) = self.allocator.allocate(1)
            self.allocator.free([page])
            seq.tables[group][keep - 1] = private
            copies.append((page, private))
        for table in seq.tables:
            self._free(table[keep:])
            del table[keep:]
        del seq.token_ids[new_len:]
        del seq.names[new_len // self.page_size :]
        seq.num_tokens = new_len
        return copies

    def release(self, cache_id: str) -> bool:
        seq = self._seqs.pop(cache_id, None)
        if seq is None:
            return False
        for table in seq.tables:
            self._free(table)
            table.clear()
        seq.released = True
        return True

    def _free(self, pages: list[int]) -> None:
        self.allocator.free([p for p in pages[::-1] if p != PASSED], keep=self.cache.is_named)

    def release_all(self) -> None:
        for cache_id in list(self._seqs):
            self.release(cache_id)


def _first_held(table: list[int]) -> int:
    """The index of a page table's first held page: a window passes pages oldest first, so the
    PASSED entries are a prefix (binary search: this runs for every sequence of every step)."""
    return bisect.bisect_left(range(len(table)), True, key=lambda j: table[j] != PASSED)
