"""How the decoder layers are looped: few loops, each compiled once, whatever the depth.

Layers differ only in static attributes the attention needs (the sliding window, the RoPE) —
their *kind*. Equal consecutive kinds form a run, one `lax.fori_loop` each: a uniform model is
one loop. A pattern of many short runs (Gemma 3's five local layers then one global, over 62
layers: 21 runs) instead loops over its repeating block, the block's layers unrolled in the
body, and the layers past the last whole block run as runs: Gemma-3-27B is two loops (ten
blocks of six layers, then two local layers), not 21.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Hashable, Sequence

# More runs than this take the repeating block, when the pattern has one.
MAX_RUNS = 2


@dataclasses.dataclass(frozen=True)
class LayerLoop:
    """Layers `first + b * len(block) + j` for b < count, j < len(block); layer `.. + j` has kind
    `block[j]`."""

    first: int
    count: int
    block: tuple[Hashable, ...]

    @property
    def stop(self) -> int:
        return self.first + self.count * len(self.block)


def _runs(kinds: Sequence[Hashable], first: int = 0) -> list[LayerLoop]:
    out = []
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        out.append(LayerLoop(first, n, (kind,)))
        first += n
    return out


def layer_loops(kinds: Sequence[Hashable]) -> list[LayerLoop]:
    """The loops covering layers `0 .. len(kinds)` in order (see the module docstring)."""
    runs = _runs(kinds)
    if len(runs) <= MAX_RUNS:
        return runs
    n = len(kinds)
    for period in range(2, n // 2 + 1):
        if all(kinds[i] == kinds[i % period] for i in range(n)):
            blocks = n // period
            whole = LayerLoop(0, blocks, tuple(kinds[:period]))
            return [whole, *_runs(kinds[whole.stop :], whole.stop)]
    return runs
