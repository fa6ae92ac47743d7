"""How tensor parallelism splits a quantized weight's scales: like the axes they follow."""

from __future__ import annotations

from jax.sharding import PartitionSpec as P


def scale_spec(weight_spec: P, n_in: int, groups: int | None, tp: int, inner: int = 1) -> P:
    """Sharding of one layer's scale from its weight's: per channel (groups None), the output
    axes'; grouped, a groups axis first (then `inner` unsplit axes: int4's step/offset pair),
    split like the inputs (row-parallel layers split their inputs) when the shards hold whole
    groups, else replicated."""
    entries = tuple(weight_spec) + (None,) * 8
    ins, outs = entries[:n_in], tuple(weight_spec)[n_in:]
    if groups is None:
        return P(*outs)
    split = next((e for e in ins if e is not None), None)
    return P(split if groups % tp == 0 else None, *(None,) * inner, *outs)
