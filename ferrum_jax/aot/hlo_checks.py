"""What a compiled program's HLO text says about the KV pool and collectives.

A copy of a KV-page array is any `copy`, `copy-start` or `transpose` (or a fusion calling one)
whose result has the dimensions of one device's whole K or V pool or of one layer's share of
it, in any order, with or without (pages, page_size) merged into one: a relayout of the pool
whatever the permutation. Matching dimensions rather than element counts keeps a layer's
weight slice that happens to hold as many elements from counting.
"""

from __future__ import annotations

import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+(copy|copy-start|transpose|fusion)\((.*)$")
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_CALLS = re.compile(r"calls=%(\S+?)[,\s]")
_ALL_REDUCE = re.compile(r"=\s*\S.*?\s(all-reduce|all-reduce-start)\(")


def _signature(dims) -> tuple[int, ...]:
    return tuple(sorted(d for d in dims if d != 1))


def kv_pool_copies(hlo: str, pool_shape: tuple[int, ...], slots: int) -> list[str]:
    """The instructions of `hlo` that copy or relayout a KV-page array of `pool_shape` (one
    device's K or V pool, all layers: `[kv_rows, slots * num_pages, page_size, head_dim]`, see
    kv.pages), or one slot's part of it, as lines of HLO text."""
    rows, pages, page_size, head_dim = pool_shape
    signatures = set()
    for p in (pages, pages // slots):
        signatures.add(_signature((rows, p, page_size, head_dim)))
        signatures.add(_signature((rows, p * page_size, head_dim)))
    found = []
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        result, op, rest = m.groups()
        if op == "fusion":
            called = _CALLS.search(rest + " ")
            if called is None or not re.search(r"copy|transpose", called.group(1)):
                continue
        if any(_signature(int(d) for d in dims.split(",")) in signatures for dims in _ARRAY.findall(result) if dims):
            found.append(line.strip())
    return found


def count_all_reduces(hlo: str) -> int:
    """all-reduce instructions in the whole module (a scanned layer body counts once)."""
    return len(_ALL_REDUCE.findall(hlo))
