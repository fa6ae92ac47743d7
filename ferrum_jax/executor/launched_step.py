"""A sampling step in flight: dispatched to the device, its tokens not yet read.

`JaxModelExecutor.launch_unified` returns a `LaunchedStep` as soon as the step and its sampler
are queued (JAX dispatches asynchronously), so the engine can prepare and launch the next step
while this one runs; the next step may consume this one's tokens on device through `ids`.
`tokens()` is the only point that waits for the device.

The launch can also be cut in two (`launch_forward`, then `launch_sampler`): a `ForwardStep` is
the forward alone, its logits left on device, so the host can still decide what the sampler
needs (a grammar's allowed tokens, known only once the previous step's tokens are read) while
the device computes the forward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ferrum_jax.step.sampling import SampledTokens


@dataclasses.dataclass(frozen=True)
class SampledToken:
    """One token drawn on device, its raw logprob, and the top alternatives `[k]`."""

    token_id: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class ForwardStep:
    """A launched forward whose sampler is not launched yet. logits: `[logit_rows, vocab]` on
    device; num_rows: the sampling rows it needs (its final items); the rest as LaunchedStep."""

    logits: jax.Array
    num_rows: int
    row_of_item: tuple[int | None, ...]
    next_of_item: tuple[tuple[object, int], ...]
    kind: str
    num_tokens: int
    started: float

    @property
    def logit_rows(self) -> int:
        return self.logits.shape[0]


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """sampled: the sampler's output `[rows]`, on device; ids: its token ids padded to the
    feed size, on device (a later step's `Feed.prev_ids`); row_of_item: the sampler row of each
    item, None for items that are not final chunks; next_of_item: per item its sequence and the
    position its sampled token takes when appended (the host learns the id at `collect`);
    kind ("prefill"/"decode"), num_tokens and started (perf_counter at launch) feed the
    executor's metrics."""

    sampled: SampledTokens
    ids: jax.Array
    row_of_item: tuple[int | None, ...]
    next_of_item: tuple[tuple[object, int], ...]
    kind: str
    num_tokens: int
    started: float

    def tokens(self) -> list[SampledToken | None]:
        """Per item the sampled token (final chunks) or None; waits for the device."""
        host = jax.tree.map(np.asarray, self.sampled)
        return [
            None if row is None else SampledToken(
                token_id=int(host.token_ids[row]),
                logprob=float(host.logprobs[row]),
                top_ids=host.top_ids[row],
                top_logprobs=host.top_logprobs[row],
            )
            for row in self.row_of_item
        ]
