"""`JaxModelExecutor`: the imperative wrapper around the pure ragged step.

It owns the parameters, the KV-page pytree, the page allocator and the handles; turns the
interface's inputs into `SequenceChunk`s; packs them into as few bucketed steps as the
limits allow; and hands back host numpy logits (slicing on the host compiles nothing, so a
warmed-up executor never compiles again).

Every method validates its whole input before touching any state, so a bad request is a
`FerrumError` that leaves all other sequences exactly as they were.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.batch.ragged import NO_FEED, Feed, SequenceChunk, build_feed, build_ragged_batch
from ferrum_jax.executor.compile_cache import enable_persistent_cache
from ferrum_jax.executor.launched_step import ForwardStep, LaunchedStep, SampledToken
from ferrum_jax.executor.platform_defaults import (
    default_dtype,
    default_max_num_batched_tokens,
    resolve_attention,
    step_cost,
)
from ferrum_jax.executor.program_plan import (
    PROGRAM_FAMILIES,
    ProgramInputs,
    StepFunctions,
    compile_programs,
    num_programs,
)
from ferrum_jax.executor.program_store import ProgramStore
from ferrum_jax.executor.sequence_table import UNKNOWN, PagedKvCacheHandle, Sequence, SequenceTable
from ferrum_jax.interfaces import (
    AttentionType,
    BatchModelExecutor,
    DataType,
    DecodeInput,
    DecodeOutput,
    Device,
    ExecutorCapabilities,
    ExecutorMemoryUsage,
    ExecutorMetrics,
    ExecutorState,
    ExecutorStatus,
    FerrumError,
    KvCacheHandle,
    MemoryRequirements,
    ModelInfo,
    PrefillInput,
    PrefillOutput,
    SpeculativeDecodeOutput,
    SpeculativeExecutor,
    UnifiedBatch,
    UnifiedBatchItem,
)
from ferrum_jax.kv.allocator import PageAllocator
from ferrum_jax.kv.layout import kv_layout
from jax.sharding import Mesh, NamedSharding

from ferrum_jax.kv.calibration import kv_amax, kv_scales
from ferrum_jax.kv.pages import KvPages, abstract_kv_pages, allocate_kv_pages, copy_page, kv_bytes_per_token, kv_scaled
from ferrum_jax.kv.pages import kv_cache_dtype as kv_cache_dtype_of
from ferrum_jax.kv.prefix_cache import PrefixMatch
from ferrum_jax.models.paged_attention import AttentionBackend
from ferrum_jax.models.sharding import kv_rows, kv_scale_spec, kv_spec, make_mesh
from pallas_kernels.expert_mlp.cpu_kernel import target_name as expert_kernel_target
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.int4_codes import state_to_uint4, wants_uint4
from ferrum_jax.models.param_tree import state_nbytes
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.registry import declarations
from pallas_kernels.ragged_paged_attention.dispatch import fp8_supported
from ferrum_jax.step.ragged_step import feed_sharding, make_ragged_step, make_sampler
from ferrum_jax.step.sampling import SamplingRow, bitmask_words, build_sampling_batch, sampling_probs

_LATENCY_WINDOW = 1024
# One background thread for KV pool allocations (see __init__).
_ALLOCATOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferrum-kv-alloc")


@dataclasses.dataclass
class _Work:
    """One sequence's share of a request: tokens to append and which logits come back."""

    seq: Sequence
    token_ids: np.ndarray
    positions: np.ndarray
    logits: str  # "none" | "last" | "all"


class JaxModelExecutor(SpeculativeExecutor, BatchModelExecutor):
    def __init__(
        self,
        cfg: ModelConfig,
        graphdef,
        state,
        *,
        model_id: str,
        dtype: str,
        page_size: int = 16,
        max_batch_size: int = 32,
        max_sequence_length: int = 2048,
        num_pages: int | None = None,
        attention: str = "auto",
        max_num_batched_tokens: int | None = None,
        hf_config: dict | None = None,
        mesh: Mesh | None = None,
        enable_prefix_caching: bool = True,
        quantization: Quantization | None = None,
        kv_cache_dtype: str = "auto",
        enable_expert_parallel: bool = False,
    ):
        """`state` must already be placed as `param_shardings(cfg, mesh, enable_expert_parallel)` says; the
        classmethods below do that. mesh None: one device. enable_prefix_caching: full KV
        pages are named by their prefix and `match_prefix` finds them for a new sequence.
        quantization: how `state`'s linear weights are quantized (None: float); on TPU packed
        int4 weights become `uint4` here (models.int4_codes), consuming the arrays passed in. kv_cache_dtype:
        "auto" (the model dtype), "int8" or "fp8" (e4m3): pages of one byte per value, half of
        bfloat16's bytes per token, with per-(layer, KV head) scales calibrated here
        (`kv.calibration`). enable_expert_parallel: a mixture of experts' stacks are split over the
        mesh by expert (models.sharding), not by their inner width."""
        if page_size < 1:
            raise FerrumError.invalid_config(f"page_size={page_size}: must be >= 1")
        if max_sequence_length < 1:
            raise FerrumError.invalid_config(f"max_sequence_length={max_sequence_length}: must be >= 1")
        self.compilation_cache_dir = enable_persistent_cache()
        self.cfg = cfg
        self.hf_config = hf_config
        self.dtype = dtype
        self.quantization = quantization
        self.kv_dtype = kv_cache_dtype_of(kv_cache_dtype, dtype)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.mesh = mesh or make_mesh(1)
        platform = self.mesh.devices.flat[0].platform
        self.attention_impl = resolve_attention(attention, platform)
        fp8_pages = jnp.issubdtype(self.kv_dtype, jnp.floating) and self.kv_dtype.itemsize == 1
        if fp8_pages and self.attention_impl == "pallas" and not fp8_supported(self.mesh.devices.flat[0]):
            raise FerrumError.invalid_config(
                f"kv_cache_dtype={kv_cache_dtype!r} with the Triton attention kernel needs compute capability >= 8.9, "
                f"this GPU has {self.mesh.devices.flat[0].compute_capability}: use attention='xla' or kv_cache_dtype='auto'"
            )
        pages_per_seq = -(-max_sequence_length // page_size)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_max_num_batched_tokens(platform)
        self.kv_layout = kv_layout(cfg)
        self.buckets = BucketSpec(max_num_batched_tokens, max_batch_size, pages_per_seq,
                                  step_cost(cfg, state, self.mesh.devices.flat[0]), self.kv_layout.num_groups)
        if num_pages is None:
            num_pages = self.kv_layout.default_num_pages(max_batch_size, max_sequence_length, page_size, max_num_batched_tokens)
        self._graphdef = graphdef
        # int4 weights take the platform's form once, here (see int4_codes).
        self._state = state_to_uint4(state) if wants_uint4(platform) else state
        self.tensor_parallel_size = self.mesh.shape["model"]
        tp = self.tensor_parallel_size
        kv_args = (cfg, num_pages, page_size, self.kv_dtype, kv_rows(cfg, tp), NamedSharding(self.mesh, kv_spec(tp)),
                   NamedSharding(self.mesh, kv_scale_spec(tp)))
        self._abstract_kv = abstract_kv_pages(*kv_args)
        self.expert_parallel = enable_expert_parallel and cfg.num_experts > 0 and tp > 1
        backend = AttentionBackend(self.attention_impl, self.mesh, self.expert_parallel)
        scales = None
        if kv_scaled(self.kv_dtype):
            amax = kv_amax(graphdef, self._state, cfg, backend, jnp.dtype(dtype), page_size, kv_rows(cfg, tp))
            scales = kv_scales(*amax, self.kv_dtype)
        # Zeroing the pool is first-touch page faults (~6 s for the default model's 3 GiB on
        # this CPU): it runs in a thread while loading finishes and warmup compiles against
        # `_abstract_kv`; the first step waits for it (`_kv`).
        self._kv_allocation = _ALLOCATOR.submit(allocate_kv_pages, *kv_args, scales=scales)
        self._kv_pages: KvPages | None = None
        self._step = make_ragged_step(graphdef, backend)
        feed_rows = self.buckets.max_num_seqs
        self._sampler = make_sampler(backend, feed_rows)
        self._no_feed = Feed(
            prev_ids=jax.device_put(np.zeros(feed_rows, np.int32), feed_sharding(backend)),
            pos=np.full(feed_rows, NO_FEED, np.int32),
            rows=np.zeros(feed_rows, np.int32),
        )
        self._distribution = jax.jit(sampling_probs)
        # Every program runs as an ahead-of-time executable, compiled (or loaded) once per
        # (kind, bucket): warmup compiles without running anything, a restart loads from disk.
        self._store = ProgramStore(self.compilation_cache_dir, persistent=not (platform == "cpu" and self.mesh.size > 1))
        self._programs: dict[tuple[str, object], jax.stages.Compiled] = {}
        self._all_allowed: dict[int, jax.Array] = {}
        # What shapes a program beyond its arguments' avals: the sampler's ids size is a constant.
        self._static = "\n".join(
            [repr(cfg), str(dtype), self.attention_impl, str(backend.cpu_kernel), repr(self.mesh), repr([d.id for d in self.mesh.devices.flat]),
             f"feed_rows={feed_rows}", f"expert_parallel={self.expert_parallel}",
             str(expert_kernel_target() if cfg.num_experts and platform == "cpu" else None)]
        )
        self._seqs = SequenceTable(PageAllocator(num_pages), page_size, max_sequence_length, enable_prefix_caching,
                                   self.kv_layout.windows)
        self._info = ModelInfo(
            model_id=model_id,
            model_type=cfg.architecture,
            num_parameters=declarations(cfg).num_parameters(),
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            vocab_size=cfg.vocab_size,
            max_sequence_length=max_sequence_length,
            dtype=DataType.from_str(dtype),
            device=_device(),
        )
        self._state_name = ExecutorState.READY
        self._counts = collections.Counter()
        self._latencies = {k: collections.deque(maxlen=_LATENCY_WINDOW) for k in ("prefill", "decode")}
        self._total_ms = collections.Counter()
        self._tokens_processed = 0
        self._busy_s = 0.0
        self._peak_pages = 0
        self._last_batch = 0
        self._last_operation: float | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | None = None,
        page_size: int = 16,
        max_batch_size: int = 32,
        max_sequence_length: int = 2048,
        num_pages: int | None = None,
        attention: str = "auto",
        tensor_parallel_size: int = 1,
        max_num_batched_tokens: int | None = None,
        progress: bool = True,
        enable_prefix_caching: bool = True,
        quantization: str | Quantization | None = None,
        kv_cache_dtype: str = "auto",
        enable_expert_parallel: bool = False,
    ) -> "JaxModelExecutor":
        """Loads a HF directory (config.json + safetensors), a ferrum orbax checkpoint, or a GGUF
        file (or a directory holding one). `dtype` casts whatever the source holds; None is
        float32 on CPU, bfloat16 on GPU/TPU. quantization: "int8" / "int4" quantizes the linear
        layers' weights on load (see models.quantization); a quantized orbax checkpoint
        restores as it was saved."""
        from ferrum_jax.executor.loading import load_params

        mesh = make_mesh(tensor_parallel_size)
        dtype = dtype or default_dtype(mesh.devices.flat[0].platform)
        loaded = load_params(Path(path), dtype, mesh, progress=progress, quant=Quantization.parse(quantization),
                             expert_parallel=enable_expert_parallel)
        return cls(
            loaded.cfg,
            loaded.graphdef,
            loaded.state,
            model_id=loaded.model_id,
            dtype=dtype,
            page_size=page_size,
            max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length,
            num_pages=num_pages,
            attention=attention,
            max_num_batched_tokens=max_num_batched_tokens,
            hf_config=loaded.hf_config,
            mesh=mesh,
            enable_prefix_caching=enable_prefix_caching,
            quantization=loaded.quant,
            kv_cache_dtype=kv_cache_dtype,
            enable_expert_parallel=enable_expert_parallel,
        )

    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides) -> "JaxModelExecutor":
        """A preset from `configs/` ("tiny", the test model: seeded random weights).
        `overrides` replace the preset's executor options; `seed` its weight seed."""
        from ferrum_jax.executor.presets import load_preset

        preset = load_preset(name)
        options = {**preset.executor_options, **overrides}
        seed = options.pop("seed", preset.seed)
        return cls.from_config(preset.model, seed=seed, model_id=name, hf_config=preset.hf_config, **options)

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, seed: int = 0, model_id: str = "random", hf_config: dict | None = None, **options
    ) -> "JaxModelExecutor":
        """A model of `cfg` with seeded random weights (tests, benchmarks, the presets)."""
        from ferrum_jax.models.param_tree import random_model

        mesh = make_mesh(options.pop("tensor_parallel_size", 1))
        dtype = options.pop("dtype", None) or default_dtype(mesh.devices.flat[0].platform)
        quant = Quantization.parse(options.pop("quantization", None))
        graphdef, state = random_model(cfg, jnp.dtype(dtype), seed, mesh, quant, options.get("enable_expert_parallel", False))
        return cls(
            cfg, graphdef, state, model_id=model_id, dtype=dtype, hf_config=hf_config, mesh=mesh, quantization=quant,
            **options,
        )

    def save_checkpoint(self, path: str | Path) -> None:
        """Writes the converted parameters as a ferrum orbax checkpoint that
        `from_pretrained(path)` restores directly."""
        from ferrum_jax.models.checkpoint import save_checkpoint
        from ferrum_jax.models.int4_codes import to_packed
        from ferrum_jax.models.param_tree import flatten_state
        from ferrum_jax.models.vocab_padding import unpad

        self._check_live()
        if self.hf_config is None:
            raise FerrumError.unsupported("this executor was built from a ModelConfig alone: no HF config.json to save")
        save_checkpoint(
            path, unpad(declarations(self.cfg), to_packed(flatten_state(self._state)), self.cfg.vocab_size), self.hf_config, self.dtype,
            self.quantization,
        )

    # ------------------------------------------------------------------ interface

    def info(self) -> ModelInfo:
        return self._info

    def new_kv_cache(self, cache_id: str | None = None, prefix: PrefixMatch | None = None) -> PagedKvCacheHandle:
        """An empty sequence, e.g. for the first chunk of a unified-batch prefill; with `prefix`
        (from `match_prefix`, nothing changed since) it already holds the prefix's cached KV
        and its `num_tokens` says how many tokens are left to compute."""
        self._check_live()
        return self._seqs.handle(self._seqs.create(cache_id, prefix))

    def match_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> PrefixMatch:
        """The cached KV pages `token_ids` starts with (none with prefix caching off); at least
        the last token is always left to compute. Changes nothing: pass the match to
        `new_kv_cache` to use it."""
        return self._seqs.cache.match(token_ids, cache_salt)

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        return (await self.batch_prefill([input]))[0]

    async def batch_prefill(self, inputs: list[PrefillInput]) -> list[PrefillOutput]:
        """All prompts in as few steps as the token budget allows (ONE when they fit)."""
        self._check_live()
        ids = [self._prompt_ids(inp) for inp in inputs]
        handles = [inp.kv_cache for inp in inputs]
        existing = [self._seqs.lookup(h) for h in handles if h is not None]
        if len({s.cache_id for s in existing}) != len(existing):
            raise FerrumError.invalid_request("the same kv cache appears twice in one batch")
        fresh = [self._seqs.create() for h in handles if h is None]
        fresh_iter = iter(fresh)
        try:
            seqs = [self._seqs.lookup(h) if h is not None else next(fresh_iter) for h in handles]
            work = [
                _Work(seq, tok, self._positions(inp, seq, len(tok)), "all")
                for inp, seq, tok in zip(inputs, seqs, ids)
            ]
            logits = self._execute(work, "prefill")
        except BaseException:
            for seq in fresh:
                self._seqs.release(seq.cache_id)
            raise
        return [PrefillOutput(logits=lg[None], kv_cache=self._seqs.handle(seq)) for lg, seq in zip(logits, seqs)]

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        return (await self.batch_decode([input]))[0]

    async def batch_decode(self, inputs: list[DecodeInput]) -> list[DecodeOutput]:
        """One token for each sequence, ONE forward (up to max_batch_size sequences)."""
        self._check_live()
        seqs = self._distinct([inp.kv_cache for inp in inputs])
        work = []
        for inp, seq in zip(inputs, seqs):
            tok = self._token_ids(inp.input_ids, "DecodeInput.input_ids", exact_len=1)
            work.append(_Work(seq, tok, self._positions(inp, seq, 1), "last"))
        logits = self._execute(work, "decode")
        return [DecodeOutput(logits=lg, kv_cache=self._seqs.handle(seq)) for lg, seq in zip(logits, seqs)]

    async def unified_decode(self, batch: UnifiedBatch) -> list[np.ndarray | None]:
        """ONE forward over any mix of prefill chunks and decode items.

        Returns `[vocab]` float32 logits for final chunks, None for intermediate ones.
        """
        work = self._unified_work(batch.items)
        kind = "decode" if all(len(w.token_ids) == 1 for w in work) else "prefill"
        logits = self._execute(work, kind)
        return [lg[-1] if item.is_final_chunk else None for lg, item in zip(logits, batch.items)]

    def sample_unified(self, items: list[UnifiedBatchItem], rows: list[SamplingRow],
                       allowed: np.ndarray | None = None) -> list[SampledToken | None]:
        """The engine's hot path: ONE forward over `items` that samples on device.

        `rows` holds the sampling settings of the final items, in item order; `allowed` their
        packed allowed-token bitmasks (see `launch_sampler`). Returns, per item, the sampled
        token (final items) or None. Synchronous so the engine can run it in a worker thread
        while its event loop keeps serving.
        """
        return self.collect(self.launch_sampler(self.launch_forward(items), rows, allowed))

    def launch_unified(self, items: list[UnifiedBatchItem], rows: list[SamplingRow],
                       feed: tuple[LaunchedStep, list[tuple[int, int]]] | None = None) -> LaunchedStep:
        """`sample_unified` without waiting for the device: the step and its sampler are queued
        and the returned LaunchedStep reads the tokens (`collect`). feed: (an earlier launched
        step, [(item, its item)]): each listed item is a single token whose id is not known on
        the host yet (its id here is ignored); the step takes it from that step's sampled ids on
        device."""
        return self.launch_sampler(self.launch_forward(items, feed), rows)

    def launch_forward(self, items: list[UnifiedBatchItem],
                       feed: tuple[LaunchedStep, list[tuple[int, int]]] | None = None) -> ForwardStep:
        """The forward of `launch_unified` alone (same `feed`); `launch_sampler` samples it."""
        work = self._unified_work(items)
        for w in work:
            self._seqs.check_room(w.seq, len(w.token_ids))
        self._seqs.reserve([(w.seq, w.seq.num_tokens + len(w.token_ids)) for w in work])
        t0 = time.perf_counter()
        ((chunks, _),) = self._plan_steps(work)
        batch, shape, _ = build_ragged_batch(chunks, self.buckets, self.page_size)
        step_feed = None
        if feed is not None:
            prev, pairs = feed
            starts = np.cumsum([0] + [len(w.token_ids) for w in work])
            for item, _ in pairs:
                if len(work[item].token_ids) != 1:
                    raise FerrumError.internal(f"fed item {item} has {len(work[item].token_ids)} tokens, not 1")
            step_feed = build_feed(prev.ids, [(int(starts[item]), prev.row_of_item[from_item]) for item, from_item in pairs])
        logits = self._run_step(batch, shape, step_feed)
        fed = {item for item, _ in feed[1]} if feed is not None else set()
        for i, w in enumerate(work):
            self._seqs.append(w.seq, [UNKNOWN] if i in fed else w.token_ids)
        row_of_item = tuple(np.cumsum([item.is_final_chunk for item in items]) - 1)
        return ForwardStep(
            logits=logits,
            num_rows=sum(item.is_final_chunk for item in items),
            row_of_item=tuple(int(r) if item.is_final_chunk else None for r, item in zip(row_of_item, items)),
            next_of_item=tuple((w.seq, w.seq.num_tokens) for w in work),
            kind="decode" if all(len(w.token_ids) == 1 for w in work) else "prefill",
            num_tokens=sum(len(w.token_ids) for w in work),
            started=t0,
        )

    def launch_sampler(self, forward: ForwardStep, rows: list[SamplingRow], allowed: np.ndarray | None = None) -> LaunchedStep:
        """Queues the sampler over a launched forward. rows: the settings of its final items,
        in item order; allowed: `[len(rows), bitmask_words(vocab)]` int32 packed allowed-token
        bitmasks (structured outputs), None allowing everything."""
        if len(rows) != forward.num_rows:
            raise FerrumError.internal(f"{len(rows)} sampling rows for {forward.num_rows} final items")
        n, words = forward.logit_rows, bitmask_words(self.cfg.vocab_size)
        if allowed is not None:
            padded = np.full((n, words), -1, np.int32)
            padded[: len(allowed)] = allowed
            allowed = padded
        else:
            # A step without a constrained row moves no bitmask: one everything-allowed mask
            # per row bucket stays on the device, where the sampler program expects it.
            allowed = self._all_allowed.get(n)
            if allowed is None:
                host = np.full((n, words), -1, np.int32)
                sampling = build_sampling_batch(rows, n, self.max_sequence_length, self.cfg.vocab_size, host)
                program = self._program("sampler", n, self._sampler, (forward.logits, sampling))
                allowed = self._all_allowed[n] = jax.device_put(host, program.input_shardings[0][1].allowed)
        sampling = build_sampling_batch(rows, n, self.max_sequence_length, self.cfg.vocab_size, allowed)
        sampled, ids = self._run_program("sampler", n, self._sampler, forward.logits, sampling)
        return LaunchedStep(
            sampled=sampled,
            ids=ids,
            row_of_item=forward.row_of_item,
            next_of_item=forward.next_of_item,
            kind=forward.kind,
            num_tokens=forward.num_tokens,
            started=forward.started,
        )

    def collect(self, launched: LaunchedStep) -> list[SampledToken | None]:
        """The tokens of a launched step (see LaunchedStep.tokens); waits for the device."""
        tokens = launched.tokens()
        for (seq, position), tok in zip(launched.next_of_item, tokens):
            if tok is not None:
                self._seqs.resolve(seq, position, tok.token_id)
        self._record(launched.kind, time.perf_counter() - launched.started, launched.num_tokens, len(tokens))
        return tokens

    def extend(self, items: list[tuple[KvCacheHandle, list[int]]], rows: str) -> list[np.ndarray]:
        """Appends each item's tokens to its sequence, as few forwards as the limits allow
        (ONE when they fit); per item the float32 logits of its last token (`rows="last"`,
        `[1, vocab]`) or of every token (`rows="all"`, `[n, vocab]`). Synchronous: the
        engine's speculative path runs it in its worker thread."""
        self._check_live()
        seqs = self._distinct([h for h, _ in items])
        work = []
        for (_, tokens), seq in zip(items, seqs):
            tok = self._token_ids(np.asarray(tokens, np.int64)[None], f"tokens for {seq.cache_id!r}")
            work.append(_Work(seq, tok, np.arange(seq.num_tokens, seq.num_tokens + len(tok), dtype=np.int32), rows))
        return self._execute(work, "decode")

    def distribution(self, logits: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
        """The exact `[n, vocab]` distribution the sampler would draw each logits row from
        under `rows` (penalties, temperature, filters; one-hot when greedy)."""
        n = len(rows)
        padded_n = self.buckets.token_bucket(n)
        padded = np.zeros((padded_n, self.cfg.vocab_size), np.float32)
        padded[:n] = logits
        sampling = build_sampling_batch(rows, padded_n, self.max_sequence_length, self.cfg.vocab_size)
        return np.asarray(self._run_program("distribution", padded_n, self._distribution, padded, sampling))[:n]

    def pages_needed(self, kv_cache: KvCacheHandle | None, new_tokens: int) -> int:
        """Pages a sequence (None: a new one) must gain to hold `new_tokens` more tokens, less
        those its sliding windows give back first (see SequenceTable.pages_needed)."""
        if kv_cache is None:
            return self.kv_layout.num_groups * -(-new_tokens // self.page_size)
        seq = self._seqs.lookup(kv_cache)
        return self._seqs.pages_needed(seq, seq.num_tokens + new_tokens)

    def pages_to_hold(self, tokens: int) -> int:
        """The most pages one sequence of `tokens` tokens holds at once, computed in steps of at
        most max_num_batched_tokens (kv.layout.KvLayout.pages_held)."""
        return self.kv_layout.pages_held(tokens, self.page_size, self.buckets.max_num_batched_tokens)

    def _unified_work(self, items: list[UnifiedBatchItem]) -> list[_Work]:
        self._check_live()
        seqs = self._distinct([item.kv_cache for item in items])
        work = []
        for item, seq in zip(items, seqs):
            if item.pos_offset != seq.num_tokens:
                raise FerrumError.invalid_request(
                    f"item {item.seq_id!r}: pos_offset={item.pos_offset} but its kv cache holds {seq.num_tokens} tokens"
                )
            tok = self._token_ids(np.asarray(item.q_tokens, np.int64)[None], f"item {item.seq_id!r} q_tokens")
            pos = np.arange(item.pos_offset, item.pos_offset + len(tok), dtype=np.int32)
            work.append(_Work(seq, tok, pos, "last" if item.is_final_chunk else "none"))
        self._check_fits_one_step(work)
        return work

    async def forward_verify(self, inputs: list[DecodeInput]) -> list[DecodeOutput]:
        """ONE forward over every input token; the inputs of one sequence are its consecutive
        next tokens. Returns one `[1, vocab]` row per input, in input order."""
        self._check_live()
        groups: dict[str, list[int]] = {}
        for i, inp in enumerate(inputs):
            groups.setdefault(self._seqs.lookup(inp.kv_cache).cache_id, []).append(i)
        work = []
        for members in groups.values():
            seq = self._seqs.lookup(inputs[members[0]].kv_cache)
            tok = np.concatenate(
                [self._token_ids(inputs[i].input_ids, "DecodeInput.input_ids", exact_len=1) for i in members]
            )
            pos = np.arange(seq.num_tokens, seq.num_tokens + len(tok), dtype=np.int32)
            work.append(_Work(seq, tok, pos, "all"))
        self._check_fits_one_step(work)
        logits = self._execute(work, "decode")
        out: list[DecodeOutput | None] = [None] * len(inputs)
        for w, members, lg in zip(work, groups.values(), logits):
            for row, i in enumerate(members):
                out[i] = DecodeOutput(logits=lg[row : row + 1], kv_cache=self._seqs.handle(w.seq))
        return out

    async def speculative_decode(
        self, input: DecodeInput, draft_tokens: list[int], acceptance_threshold: float
    ) -> SpeculativeDecodeOutput:
        """Verifies `draft_tokens` after `input`'s token in one forward.

        A draft equal to the target argmax is accepted; another only if its target
        probability is >= acceptance_threshold; acceptance stops at the first rejection and
        the KV is truncated to the accepted prefix. next_logits `[1, vocab]` follow the last
        accepted token.
        """
        self._check_live()
        seq = self._seqs.lookup(input.kv_cache)
        first = self._token_ids(input.input_ids, "DecodeInput.input_ids", exact_len=1)
        drafts = self._token_ids(np.asarray(draft_tokens, np.int64)[None], "draft_tokens", allow_empty=True)
        start = seq.num_tokens
        tok = np.concatenate([first, drafts])
        pos = np.arange(start, start + len(tok), dtype=np.int32)
        (logits,) = self._execute([_Work(seq, tok, pos, "all")], "decode")
        accepted = 0
        for i, d in enumerate(drafts):
            row = logits[i]
            if int(np.argmax(row)) != int(d) and _softmax(row)[d] < acceptance_threshold:
                break
            accepted += 1
        self._seqs.truncate(seq, start + 1 + accepted)
        return SpeculativeDecodeOutput(
            accepted_tokens=[int(d) for d in drafts[:accepted]],
            next_logits=logits[accepted : accepted + 1],
            kv_cache=self._seqs.handle(seq),
            acceptance_count=accepted,
        )

    def allow_rollback(self, tokens: int) -> None:
        """Callers may truncate up to `tokens` from a sequence's end (speculative drafts and the
        token they follow): sliding-window layers then keep the KV a query that far back reads,
        which `truncate` would otherwise refuse once the window has passed it."""
        self._seqs.rollback_tokens = max(self._seqs.rollback_tokens, tokens)

    async def truncate_kv(self, kv_cache: KvCacheHandle, new_len: int) -> None:
        self.truncate(kv_cache, new_len)

    def truncate(self, kv_cache: KvCacheHandle, new_len: int) -> None:
        """`truncate_kv` without the coroutine, for the engine's worker-thread paths."""
        self._check_live()
        for src, dst in self._seqs.truncate(self._seqs.lookup(kv_cache), int(new_len)):
            self._kv = copy_page(self._kv, np.int32(src), np.int32(dst))

    def release_cache(self, cache_id: str) -> None:
        self._seqs.release(cache_id)

    def capabilities(self) -> ExecutorCapabilities:
        mechanisms = [AttentionType.PAGED, AttentionType.FLASH if self.attention_impl != "xla" else None]
        mechanisms.append(
            AttentionType.MULTI_HEAD
            if self.cfg.q_per_kv == 1
            else AttentionType.MULTI_QUERY
            if self.cfg.num_kv_heads == 1
            else AttentionType.GROUPED_QUERY
        )
        if any(self.cfg.sliding_windows):
            mechanisms.append(AttentionType.SLIDING_WINDOW)
        return ExecutorCapabilities(
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            attention_mechanisms=[m for m in mechanisms if m is not None],
            supports_dynamic_batching=True,
            supports_continuous_batching=True,
            supports_speculative_decoding=True,
            supports_tensor_parallelism=True,
            supports_pipeline_parallelism=False,
            supported_dtypes=[DataType.FP32, DataType.BF16, DataType.FP16],
            supported_devices=[_device()],
            memory_requirements=self.memory_requirements(),
        )

    def memory_requirements(self) -> MemoryRequirements:
        """From the real config and dtype. Activation memory per token: the widest live
        intermediates of one layer (residual + normed + q/k/v + gate/up), in the step dtype."""
        itemsize = jnp.dtype(self.dtype).itemsize
        c = self.cfg
        activation = (2 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 2 * c.intermediate_size)
        return MemoryRequirements(
            parameter_memory=state_nbytes(self._state),
            activation_memory_per_token=activation * itemsize,
            kv_cache_memory_per_token=kv_bytes_per_token(c, self.kv_dtype),
            overhead_memory=self._page_bytes,
        )

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(
            state=self._state_name,
            is_ready=self._state_name == ExecutorState.READY,
            current_batch_size=self._last_batch,
            prefill_operations=self._counts["prefill"],
            decode_operations=self._counts["decode"],
            avg_prefill_time_ms=self._avg_ms("prefill"),
            avg_decode_time_ms=self._avg_ms("decode"),
            memory_usage=self._memory_usage(),
            last_operation=self._last_operation,
        )

    def metrics(self) -> ExecutorMetrics:
        usage = self._memory_usage()
        return ExecutorMetrics(
            total_operations=self._counts["prefill"] + self._counts["decode"],
            prefill_operations=self._counts["prefill"],
            decode_operations=self._counts["decode"],
            avg_prefill_latency=self._avg_ms("prefill"),
            avg_decode_latency=self._avg_ms("decode"),
            p95_prefill_latency=_p95(self._latencies["prefill"]),
            p95_decode_latency=_p95(self._latencies["decode"]),
            throughput_tps=self._tokens_processed / self._busy_s if self._busy_s else 0.0,
            memory_efficiency=usage.used_bytes / usage.allocated_bytes if usage.allocated_bytes else 0.0,
            batch_utilization=self._last_batch / self.max_batch_size,
        )

    def optimal_batch_size(self) -> int:
        return self.max_batch_size

    def supports_batch_size(self, batch_size: int) -> bool:
        return 1 <= batch_size <= self.max_batch_size

    async def warmup(self, programs: Iterable[str] = PROGRAM_FAMILIES) -> None:
        """Compiles every bucketed program of the named families (default: all of them; see
        `ferrum_jax.executor.program_plan`), so nothing that uses only those families ever
        compiles again."""
        self._check_live()
        inputs = ProgramInputs(self._state, self._abstract_kv, self._no_feed, self.cfg.vocab_size, self.max_sequence_length)
        fns = StepFunctions(self._step, self._sampler, self._distribution)
        with tqdm(total=sum(self.num_step_programs(programs)), desc="compiling steps", unit="program") as bar:
            compile_programs(self._program, fns, inputs, self.buckets, programs, bar.update)

    def num_step_programs(self, programs: Iterable[str] = PROGRAM_FAMILIES) -> tuple[int, int, int]:
        """(logits steps, sampler programs, distribution programs) `warmup(programs)` compiles."""
        return num_programs(self.buckets, programs)

    async def shutdown(self) -> None:
        self._seqs.release_all()
        self._kv = None
        self._state_name = ExecutorState.SHUTDOWN

    @property
    def _kv(self) -> KvPages | None:
        """The KV pages, once the allocation started at construction has finished."""
        if self._kv_allocation is not None:
            self._kv_pages, self._kv_allocation = self._kv_allocation.result(), None
        return self._kv_pages

    @_kv.setter
    def _kv(self, pages: KvPages | None) -> None:
        if self._kv_allocation is not None:
            self._kv_allocation.result()
            self._kv_allocation = None
        self._kv_pages = pages

    # ------------------------------------------------------------------ page accounting

    @property
    def num_free_pages(self) -> int:
        return self._seqs.allocator.num_free

    @property
    def num_used_pages(self) -> int:
        return self._seqs.allocator.num_used

    @property
    def num_total_pages(self) -> int:
        return self._seqs.allocator.total

    @property
    def prefix_caching(self) -> bool:
        return self._seqs.cache.enabled

    @property
    def num_cached_pages(self) -> int:
        """Pages holding a named prefix (in use or free but reusable)."""
        return self._seqs.cache.num_pages

    @property
    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(tokens looked up, tokens found) by the prefix matches sequences started from."""
        return self._seqs.cache.queried_tokens, self._seqs.cache.hit_tokens

    @property
    def num_live_sequences(self) -> int:
        return len(self._seqs)

    # ------------------------------------------------------------------ internals

    def _check_live(self) -> None:
        if self._state_name == ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down")

    def _token_ids(self, ids, what: str, exact_len: int | None = None, allow_empty: bool = False) -> np.ndarray:
        """Validates `[1, n]` ids and returns them flat as int32."""
        arr = np.asarray(ids)
        if arr.ndim != 2 or arr.shape[0] != 1:
            raise FerrumError.invalid_request(f"{what} must have shape [1, n] (one sequence), got {list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise FerrumError.invalid_request(f"{what} must be integer token ids, got dtype {arr.dtype}")
        if exact_len is not None and arr.shape[1] != exact_len:
            raise FerrumError.invalid_request(f"{what} must hold exactly {exact_len} token(s), got {arr.shape[1]}")
        if arr.shape[1] == 0 and not allow_empty:
            raise FerrumError.invalid_request(f"{what} is empty")
        bad = arr[(arr < 0) | (arr >= self.cfg.vocab_size)]
        if bad.size:
            raise FerrumError.invalid_request(
                f"{what}: token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab_size})"
            )
        return arr[0].astype(np.int32)

    def _prompt_ids(self, inp: PrefillInput) -> np.ndarray:
        ids = self._token_ids(inp.input_ids, "PrefillInput.input_ids")
        if inp.attention_mask is not None:
            mask = np.asarray(inp.attention_mask)
            if mask.shape != (1, len(ids)):
                raise FerrumError.invalid_request(
                    f"attention_mask shape {list(mask.shape)} does not match input_ids [1, {len(ids)}]"
                )
            if not np.all(mask == 1):
                raise FerrumError.unsupported(
                    "attention_mask with masked (padding) positions: ragged batches carry no padding, "
                    "pass only the real tokens"
                )
        return ids

    def _positions(self, inp, seq: Sequence, n: int) -> np.ndarray:
        if getattr(inp, "position_ids", None) is None:
            return np.arange(seq.num_tokens, seq.num_tokens + n, dtype=np.int32)
        pos = np.asarray(inp.position_ids)
        if pos.shape != (1, n):
            raise FerrumError.invalid_request(f"position_ids shape {list(pos.shape)} does not match input_ids [1, {n}]")
        if np.any(pos < 0):
            raise FerrumError.invalid_request(f"position_ids must be >= 0, got {int(pos.min())}")
        if not np.array_equal(pos[0], np.arange(seq.num_tokens, seq.num_tokens + n)):
            seq.nameable = False
        return pos[0].astype(np.int32)

    def _distinct(self, handles: Iterable[KvCacheHandle]) -> list[Sequence]:
        seqs = [self._seqs.lookup(h) for h in handles]
        if len({s.cache_id for s in seqs}) != len(seqs):
            raise FerrumError.invalid_request("the same kv cache appears twice in one batch")
        return seqs

    def _check_fits_one_step(self, work: list[_Work]) -> None:
        total = sum(len(w.token_ids) for w in work)
        if total > self.buckets.max_num_batched_tokens:
            raise FerrumError.invalid_request(
                f"{total} tokens in one forward exceeds max_num_batched_tokens={self.buckets.max_num_batched_tokens}"
            )
        if len(work) > self.buckets.max_num_seqs:
            raise FerrumError.invalid_request(
                f"{len(work)} sequences in one forward exceeds max_batch_size={self.buckets.max_num_seqs}"
            )

    def _execute(self, work: list[_Work], kind: str) -> list[np.ndarray]:
        """Runs `work` (validated) in as few steps as the limits allow; per work item the
        float32 logits `[rows, vocab]` it asked for."""
        if not work:
            return []
        for w in work:
            self._seqs.check_room(w.seq, len(w.token_ids))
        self._seqs.reserve([(w.seq, w.seq.num_tokens + len(w.token_ids)) for w in work])
        t0 = time.perf_counter()
        pieces: list[list[np.ndarray]] = [[] for _ in work]
        for step_chunks, owners in self._plan_steps(work):
            batch, shape, rows = build_ragged_batch(step_chunks, self.buckets, self.page_size)
            logits = self._run_step(batch, shape)
            host = np.asarray(logits)
            for owner, r, chunk in zip(owners, rows, step_chunks):
                pieces[owner].append(host[r])
                self._seqs.append(work[owner].seq, chunk.token_ids)
                self._seqs.give_back_passed(work[owner].seq)
        elapsed = time.perf_counter() - t0
        self._record(kind, elapsed, sum(len(w.token_ids) for w in work), len(work))
        return [np.concatenate(p, axis=0) if p else np.zeros((0, self.cfg.vocab_size), np.float32) for p in pieces]

    def _program(self, kind: str, bucket, fn, args: tuple) -> jax.stages.Compiled:
        """jitted `fn` compiled for `args` (or loaded from the store), once per (kind, bucket)."""
        program = self._programs.get((kind, bucket))
        if program is None:
            program = self._programs[(kind, bucket)] = self._store.compile(fn, args, f"{self._static}\n{kind}")
        return program

    def _run_program(self, kind: str, bucket, fn, *args):
        return self._program(kind, bucket, fn, args)(*args)

    def _run_step(self, batch, shape: StepShape, feed: Feed | None = None) -> jax.Array:
        """One ragged step; the KV pages are donated and replaced. Returns the logits."""
        feed = self._no_feed if feed is None else feed
        logits, self._kv = self._run_program("step", shape, self._step, self._state, self._kv, batch, feed)
        return logits

    def _plan_steps(self, work: list[_Work]) -> list[tuple[list[SequenceChunk], list[int]]]:
        """Packs work into steps of at most max_num_batched_tokens tokens and max_batch_size
        sequences, splitting long prompts into chunks (chunked prefill). Planned up front:
        kv offsets come from the lengths before any step runs."""
        budget, max_seqs = self.buckets.max_num_batched_tokens, self.buckets.max_num_seqs
        steps: list[tuple[list[SequenceChunk], list[int]]] = []
        chunks: list[SequenceChunk] = []
        owners: list[int] = []
        used = 0
        for i, w in enumerate(work):
            done, n, base = 0, len(w.token_ids), w.seq.num_tokens
            while done < n:
                if used == budget or len(chunks) == max_seqs:
                    steps.append((chunks, owners))
                    chunks, owners, used = [], [], 0
                take = min(n - done, budget - used)
                is_last = done + take == n
                rows = "all" if w.logits == "all" else ("last" if w.logits == "last" and is_last else "none")
                chunks.append(
                    SequenceChunk(
                        token_ids=w.token_ids[done : done + take],
                        positions=w.positions[done : done + take],
                        kv_offset=base + done,
                        page_tables=w.seq.tables,
                        logits=rows,
                    )
                )
                owners.append(i)
                used += take
                done += take
        if chunks:
            steps.append((chunks, owners))
        return steps

    def _record(self, kind: str, seconds: float, tokens: int, batch: int) -> None:
        self._counts[kind] += 1
        self._latencies[kind].append(seconds * 1e3)
        self._total_ms[kind] += seconds * 1e3
        self._tokens_processed += tokens
        self._busy_s += seconds
        self._last_batch = batch
        self._peak_pages = max(self._peak_pages, self._seqs.allocator.num_used)
        self._last_operation = time.monotonic()

    @property
    def _page_bytes(self) -> int:
        """K plus V bytes of one page: page_size tokens of `slots` layers (kv.layout)."""
        return self.page_size * kv_bytes_per_token(self.cfg, self.kv_dtype) * self.kv_layout.slots

    def _avg_ms(self, kind: str) -> float:
        return self._total_ms[kind] / self._counts[kind] if self._counts[kind] else 0.0

    def _memory_usage(self) -> ExecutorMemoryUsage:
        params = state_nbytes(self._state)
        per_page = self._page_bytes
        allocated = params + per_page * self._seqs.allocator.num_pages
        used = params + per_page * self._seqs.allocator.num_used
        peak = params + per_page * self._peak_pages
        return ExecutorMemoryUsage(
            allocated_bytes=allocated,
            used_bytes=used,
            peak_bytes=max(peak, used),
            utilization_percent=100.0 * used / allocated,
        )


def _device() -> Device:
    backend = jax.default_backend()
    return Device.cpu() if backend == "cpu" else Device.tpu(0) if backend == "tpu" else Device.cuda(0)


def _softmax(row: np.ndarray) -> np.ndarray:
    z = np.exp(row - row.max())
    return z / z.sum()


def _p95(samples) -> float:
    return float(np.percentile(np.asarray(samples), 95)) if samples else 0.0
