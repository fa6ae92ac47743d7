"""Compiles a server's whole program set for a target from the model config alone.

Parameters, KV pages and the feed are ShapeDtypeStructs carrying the shardings a server on the
target would give them (`param_shardings`, `kv_spec`, `feed_sharding`) on the target's
compile-only devices: nothing is read, allocated or run. The programs and their arguments come
from `ferrum_jax.executor.program_plan`, the enumeration `JaxModelExecutor.warmup` uses, and the
attention kernel, dtype and step token budget from the target's platform
(`ferrum_jax.executor.platform_defaults`), so what compiles here is what the server compiles.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.batch.ragged import NO_FEED, Feed
from ferrum_jax.executor.platform_defaults import resolve_attention, step_cost
from ferrum_jax.executor.program_plan import ProgramInputs, StepFunctions, compile_programs
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.kv.pages import abstract_kv_pages, kv_cache_dtype
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.paged_attention import AttentionBackend
from ferrum_jax.models.int4_codes import state_to_uint4, wants_uint4
from ferrum_jax.models.param_tree import abstract_model, param_shardings, unflatten_into
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.sharding import MESH_AXES, check_divisible, kv_rows, kv_scale_spec, kv_spec
from ferrum_jax.step.ragged_step import feed_sharding, make_ragged_step, make_sampler
from ferrum_jax.step.sampling import sampling_probs


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server flags that shape the programs, resolved (no None left)."""

    dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    page_size: int
    num_pages: int
    tensor_parallel_size: int
    attention: str
    quantization: str | Quantization | None = None  # a method name, or a stored checkpoint's
    kv_cache_dtype: str = "auto"
    enable_expert_parallel: bool = False

    @property
    def expert_parallel(self) -> bool:
        """Whether the MoE stacks split by expert: asked for, over more than one device."""
        return self.enable_expert_parallel and self.tensor_parallel_size > 1


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """One program's compile time and per-device bytes (XLA's memory analysis)."""

    kind: str
    bucket: str
    seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    # XLA's cost model, which counts the scanned layer loop's body ONCE: multiply that share by
    # the layer count for the step's traffic.
    cost_bytes: float
    cost_flops: float
    hlo: str = dataclasses.field(repr=False)
    shape: StepShape | None = None  # a step program's bucket

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments, outputs not aliased to (donated) arguments, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def target_mesh(devices: list, tensor_parallel_size: int) -> Mesh:
    """The mesh `make_mesh` builds on a host with these devices."""
    if not 1 <= tensor_parallel_size <= len(devices):
        raise FerrumError.invalid_config(
            f"tensor_parallel_size={tensor_parallel_size}: the target has {len(devices)} devices"
        )
    return Mesh(np.asarray(devices[:tensor_parallel_size]).reshape(1, tensor_parallel_size), MESH_AXES)


def kv_page_shape(cfg: ModelConfig, limits: Limits) -> tuple[int, int, int, int]:
    """One of the K/V pool arrays, whole (all devices)."""
    rows = kv_rows(cfg, limits.tensor_parallel_size)
    return (rows, kv_layout(cfg).slots * limits.num_pages, limits.page_size, cfg.head_dim)


def abstract_inputs(cfg: ModelConfig, limits: Limits, mesh: Mesh, backend: AttentionBackend, feed_rows: int):
    """(graphdef, ProgramInputs) of ShapeDtypeStructs sharded as a server would place them."""
    dtype = jnp.dtype(limits.dtype)
    graphdef, abstract = abstract_model(cfg, dtype, limits.tensor_parallel_size, Quantization.parse(limits.quantization))
    shardings = unflatten_into(abstract, param_shardings(cfg, mesh, abstract, limits.expert_parallel))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if wants_uint4(mesh.devices.flat[0].platform):
        state = state_to_uint4(state)
    kv_sharding = NamedSharding(mesh, kv_spec(limits.tensor_parallel_size))
    tp = limits.tensor_parallel_size
    kv = abstract_kv_pages(cfg, limits.num_pages, limits.page_size, kv_cache_dtype(limits.kv_cache_dtype, dtype),
                           kv_page_shape(cfg, limits)[0], NamedSharding(mesh, kv_spec(tp)),
                           NamedSharding(mesh, kv_scale_spec(tp)))
    no_feed = Feed(
        prev_ids=jax.ShapeDtypeStruct((feed_rows,), jnp.int32, sharding=feed_sharding(backend)),
        pos=np.full(feed_rows, NO_FEED, np.int32),
        rows=np.zeros(feed_rows, np.int32),
    )
    return graphdef, ProgramInputs(state, kv, no_feed, cfg.vocab_size, limits.max_model_len)


@dataclasses.dataclass(frozen=True)
class ProgramSet:
    """What a server on the target would compile its programs against."""

    mesh: Mesh
    backend: AttentionBackend
    graphdef: object
    inputs: ProgramInputs
    buckets: BucketSpec


def program_set(cfg: ModelConfig, limits: Limits, devices: list) -> ProgramSet:
    check_divisible(cfg, limits.tensor_parallel_size, limits.expert_parallel)
    mesh = target_mesh(devices, limits.tensor_parallel_size)
    backend = AttentionBackend(resolve_attention(limits.attention, mesh.devices.flat[0].platform), mesh,
                               limits.expert_parallel and cfg.num_experts > 0)
    graphdef, inputs = abstract_inputs(cfg, limits, mesh, backend, limits.max_num_seqs)
    buckets = BucketSpec(limits.max_num_batched_tokens, limits.max_num_seqs, -(-limits.max_model_len // limits.page_size),
                         step_cost(cfg, inputs.state, mesh.devices.flat[0]), kv_layout(cfg).num_groups)
    return ProgramSet(mesh, backend, graphdef, inputs, buckets)


def compile_all(
    ps: ProgramSet, programs: tuple[str, ...], progress: Callable[[CompiledProgram], None] = lambda p: None,
) -> list[CompiledProgram]:
    """Compiles every program of the `programs` families; a program that fails to compile raises
    (XLA's and Mosaic's errors name the op)."""
    fns = StepFunctions(make_ragged_step(ps.graphdef, ps.backend), make_sampler(ps.backend, ps.buckets.max_num_seqs),
                        jax.jit(sampling_probs))
    replicated = NamedSharding(ps.mesh, PartitionSpec())
    out: list[CompiledProgram] = []

    def abstract(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated)

    def compile(kind, bucket, fn, args):
        t0 = time.perf_counter()
        compiled = fn.lower(*jax.tree.map(abstract, args)).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        name = f"t{bucket.tokens}_s{bucket.seqs}_l{bucket.logit_rows}" if kind == "step" else f"r{bucket}"
        out.append(CompiledProgram(
            kind, name, seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
            mem.temp_size_in_bytes, float(cost.get("bytes accessed", 0.0)), float(cost.get("flops", 0.0)),
            compiled.as_text(), bucket if kind == "step" else None,
        ))  # fmt: skip
        progress(out[-1])
        return compiled

    compile_programs(compile, fns, ps.inputs, ps.buckets, programs)
    return out


def dump_hlo(compiled: list[CompiledProgram], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for p in compiled:
        (directory / f"{p.kind}_{p.bucket}.hlo.txt").write_text(p.hlo)
