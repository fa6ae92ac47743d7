"""Every program a warmup compiles, and the arguments each is compiled for.

One enumeration serves two callers: `JaxModelExecutor.warmup`, with the executor's real
parameters and KV pages, and `ferrum_jax.aot`, with abstract ones (ShapeDtypeStructs carrying
the target's shardings), so an ahead-of-time compile for a TPU or GPU covers exactly what a
server there would compile at start-up.

The program families:
  "logits_last"  the step at one logits row per sequence (prefill, decode, `extend(.., "last")`);
  "logits_all"   the step at every row (full prefill logits, verify, `extend(.., "all")`);
  "sample"       what `sample_unified` runs (the engine's every step): the "logits_last"
                 steps and the sampler, one program per row bucket;
  "distribution" the sampler's distribution per row bucket (speculative acceptance).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.batch.ragged import Feed, dummy_batch
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.kv.pages import KvPages
from ferrum_jax.step.sampling import build_sampling_batch

PROGRAM_FAMILIES = ("logits_last", "logits_all", "sample", "distribution")
# What the server's engine runs, so its warmup compiles nothing it never uses: every step is a
# `sample_unified`; speculation adds the target's verify (`extend(.., "all")`) and exact
# acceptance (`distribution`), and a draft model extends by its last rows.
DRAFT_PROGRAMS = ("logits_last", "distribution")


def target_programs(speculative: bool) -> tuple[str, ...]:
    return ("sample", "logits_all", "distribution") if speculative else ("sample",)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted functions every program is compiled from (see `ferrum_jax.step`)."""

    step: Callable
    sampler: Callable
    distribution: Callable


@dataclasses.dataclass(frozen=True)
class ProgramInputs:
    """What a program is compiled against: parameters, KV pages and the no-op feed, either real
    arrays or ShapeDtypeStructs with shardings."""

    state: object
    kv: KvPages
    no_feed: Feed
    vocab_size: int
    max_sequence_length: int


# compile(kind, bucket, fn, args) -> the compiled program; kind is "step", "sampler" or
# "distribution", bucket a StepShape (steps) or a row count.
CompileFn = Callable[[str, object, Callable, tuple], jax.stages.Compiled]


def check_programs(programs: Iterable[str]) -> set[str]:
    programs = set(programs)
    unknown = sorted(programs - set(PROGRAM_FAMILIES))
    if unknown:
        raise FerrumError.invalid_config(f"program families {unknown} are not among {list(PROGRAM_FAMILIES)}")
    return programs


def step_shapes(buckets: BucketSpec, programs: set[str]) -> list[StepShape]:
    last = {"logits_last", "sample"} & programs
    shapes = (buckets.shapes(all_rows=False) if last else []) + (
        buckets.shapes(all_rows=True) if "logits_all" in programs else []
    )
    return list(dict.fromkeys(shapes))


def num_programs(buckets: BucketSpec, programs: Iterable[str]) -> tuple[int, int, int]:
    """(logits steps, sampler programs, distribution programs) for `programs`."""
    programs = check_programs(programs)
    return (
        len(step_shapes(buckets, programs)),
        len(buckets.row_buckets) if "sample" in programs else 0,
        len(buckets.token_buckets) if "distribution" in programs else 0,
    )


def compile_programs(
    compile: CompileFn, fns: StepFunctions, inputs: ProgramInputs, buckets: BucketSpec, programs: Iterable[str],
    progress: Callable[[], None] = lambda: None,
) -> None:
    """Calls `compile` once per program of `programs`, `progress` after each."""
    programs = check_programs(programs)
    sampler_rows = set(buckets.row_buckets) if "sample" in programs else set()
    for shape in step_shapes(buckets, programs):
        args = (inputs.state, inputs.kv, dummy_batch(shape, buckets), inputs.no_feed)
        step = compile("step", shape, fns.step, args)
        progress()
        if shape.logit_rows == shape.seqs and shape.logit_rows in sampler_rows:
            sampler_rows.remove(shape.logit_rows)
            # The sampler's key includes its input's sharding: the step's logits output.
            logits = jax.ShapeDtypeStruct(
                (shape.logit_rows, inputs.vocab_size), jnp.float32, sharding=step.output_shardings[0]
            )
            sampling = build_sampling_batch([], shape.logit_rows, inputs.max_sequence_length, inputs.vocab_size)
            compile("sampler", shape.logit_rows, fns.sampler, (logits, sampling))
            progress()
    if "distribution" in programs:
        for rows in buckets.token_buckets:
            logits = np.zeros((rows, inputs.vocab_size), np.float32)
            sampling = build_sampling_batch([], rows, inputs.max_sequence_length, inputs.vocab_size)
            compile("distribution", rows, fns.distribution, (logits, sampling))
            progress()
