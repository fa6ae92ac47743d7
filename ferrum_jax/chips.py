"""The accelerators ferrum_jax targets: one chip's HBM bandwidth and dense matmul peaks.

Published figures (Cloud TPU system-architecture pages; NVIDIA's H100 SXM and A100 80GB SXM
datasheets, without sparsity). The roofline (aot.roofline) divides by them; bucketing
(batch.step_cost) asks where a step stops being a weight stream. A chip is found from jax's
`device_kind` by the substrings it carries ("TPU v6 lite", "NVIDIA H100 80GB HBM3").
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind
    hbm_gbps: float
    bf16_tflops: float
    int8_tops: float


CHIPS = {
    c.name: c
    for c in (
        Chip("v5e", ("v5 lite", "v5e"), 819, 197, 394),
        Chip("v6e", ("v6 lite", "v6e"), 1640, 918, 1836),
        Chip("v5p", ("v5p",), 2765, 459, 918),
        Chip("h100", ("h100",), 3350, 989, 1979),
        Chip("a100", ("a100",), 2039, 312, 624),
    )
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip a jax device_kind names, or None (a CPU, or a chip not in the table)."""
    kind = device_kind.lower()
    return next((c for c in CHIPS.values() if any(k in kind for k in c.device_kinds)), None)
