"""Which layers share a KV page: the pool's layout over the layers (vLLM's hybrid KV groups).

A page of the pool holds `page_size` tokens of K and V for `slots` layers. The layers form
*groups* of at most `slots` layers that attend alike (the same sliding window); every group has
its own page table per sequence, and all groups draw pages from one allocator, so short and
long sequences, local and global layers, share one budget. A global layer reads every position
of its sequence; a sliding-window layer only the last `window`, so its group gives back the
pages its window has passed, and a long sequence holds few of them.

Groups follow the layer loops (models.layer_loops), so a layer's group is static in the loop
body and its slot is the loop index: a loop of `count` iterations over a block of layers gives
one group per block position, iteration b's layer in slot b, and `slots` is the largest count.
Gemma 3 (five local layers, then one global, repeated) has six groups, one of them global; at
32k tokens and a 1024 window its sequence holds ~1/6 + 5/6 x 1024/32768 of the pages one group
would. A model whose layers all attend alike is one group, slot = layer: the pool as it was.
Grouping pads short loops' groups to `slots`; where that would waste more than a quarter of
the layers' pages (loops of very different lengths), every layer shares one group instead,
global when any layer is.
"""

from __future__ import annotations

import dataclasses
import functools

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layer_loops import LayerLoop, layer_loops

# Grouping may pad at most this share of the layers' pages (see the module docstring).
MAX_PADDING = 0.25


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the layer at one block position of a loop keeps its KV: iteration b's layer in
    group `group`, slot `first_slot + b * slot_stride`."""

    group: int
    first_slot: int
    slot_stride: int

    def slot(self, b):
        """Slot of iteration `b` (a Python int or a traced loop index)."""
        if self.slot_stride != 1:
            b = b * self.slot_stride
        return b if self.first_slot == 0 else b + self.first_slot


@dataclasses.dataclass(frozen=True)
class KvLayout:
    slots: int  # layers per page
    windows: tuple[int | None, ...]  # per group: the sliding window, None for global layers
    loops: tuple[LayerLoop, ...]  # the model's layer loops (models.layer_loops)
    placements: tuple[tuple[Placement, ...], ...]  # per loop, per block position

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def place(self, layer: int) -> tuple[int, int]:
        """(group, slot) of `layer`."""
        for loop, places in zip(self.loops, self.placements):
            if loop.first <= layer < loop.stop:
                b, j = divmod(layer - loop.first, len(loop.block))
                return places[j].group, places[j].slot(b)
        raise IndexError(f"layer {layer} is in no loop")

    def pages_held(self, tokens: int, page_size: int, new_tokens: int) -> int:
        """The most pages one sequence of `tokens` tokens holds, computed in steps of at most
        `new_tokens`: every page in a global group; in a window group the pages a step writes
        plus those its first query still reads (at most `window - 1` positions back)."""
        pages = -(-tokens // page_size)
        span = min(new_tokens, tokens)
        return sum(
            pages if window is None else min(pages, -(-(window - 1 + span) // page_size) + 1)
            for window in self.windows
        )

    def default_num_pages(self, max_num_seqs: int, max_model_len: int, page_size: int, max_num_batched_tokens: int) -> int:
        """A pool for `max_num_seqs` sequences at full length decoding, one step's worth of
        prefill on top (window groups hold a prefill chunk's pages while it runs), and the
        reserved padding page."""
        steady = self.pages_held(max_model_len, page_size, 1)
        chunk = self.pages_held(max_model_len, page_size, max_num_batched_tokens) - steady
        return max_num_seqs * steady + chunk + 1


def layer_kinds(cfg: ModelConfig) -> tuple[tuple[int | None, object], ...]:
    """Per layer what its attention needs statically: (sliding window, RoPE)."""
    return tuple((cfg.sliding_windows[i], cfg.layer_rope(i)) for i in range(cfg.num_layers))


@functools.lru_cache(maxsize=64)
def kv_layout(cfg: ModelConfig) -> KvLayout:
    loops = tuple(layer_loops(layer_kinds(cfg)))
    slots = max(loop.count for loop in loops)
    windows, placements = [], []
    for loop in loops:
        places = []
        for kind in loop.block:
            places.append(Placement(len(windows), 0, 1))
            windows.append(kind[0])
        placements.append(tuple(places))
    if any(w is not None for w in windows) and slots * len(windows) <= (1 + MAX_PADDING) * cfg.num_layers:
        return KvLayout(slots, tuple(windows), loops, tuple(placements))
    shared = tuple(
        tuple(Placement(0, loop.first + j, len(loop.block)) for j in range(len(loop.block))) for loop in loops
    )
    window = None if None in cfg.sliding_windows else max(cfg.sliding_windows)
    return KvLayout(cfg.num_layers, (window,), loops, shared)
