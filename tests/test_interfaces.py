"""Tests for ferrum_jax.interfaces with hand-computed expected values."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from ferrum_jax.interfaces import (
    AttentionType,
    BackendError,
    DataType,
    DecodeInput,
    DecodeOutput,
    Device,
    ErrorKind,
    ExecutorCapabilities,
    ExecutorConfig,
    ExecutorMemoryConfig,
    ExecutorMemoryUsage,
    ExecutorMetrics,
    ExecutorState,
    ExecutorStatus,
    FerrumError,
    InMemoryExecutorRegistry,
    InvalidConfigError,
    InvalidRequestError,
    KvCacheHandle,
    MemoryRequirements,
    ModelExecutor,
    ModelInfo,
    OptimizationConfig,
    PrefillInput,
    PrefillOutput,
    UnifiedBatch,
    UnifiedBatchItem,
    UnsupportedError,
)


class FakeKv(KvCacheHandle):
    def __init__(self, cache_id: str, num_tokens: int = 0):
        self._cache_id = cache_id
        self._num_tokens = num_tokens

    @property
    def cache_id(self) -> str:
        return self._cache_id

    @property
    def num_tokens(self) -> int:
        return self._num_tokens


def make_model_info() -> ModelInfo:
    return ModelInfo(
        model_id="tiny",
        model_type="llama",
        num_parameters=1000,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        vocab_size=16,
        max_sequence_length=128,
        dtype=DataType.BF16,
        device=Device.cuda(0),
    )


def make_status(allocated: int = 200, used: int = 50) -> ExecutorStatus:
    return ExecutorStatus(
        state=ExecutorState.READY,
        is_ready=True,
        current_batch_size=0,
        prefill_operations=3,
        decode_operations=7,
        avg_prefill_time_ms=12.5,
        avg_decode_time_ms=2.0,
        memory_usage=ExecutorMemoryUsage(
            allocated_bytes=allocated, used_bytes=used, peak_bytes=used, utilization_percent=25.0
        ),
        last_operation=123.0,
    )


class CountingExecutor(ModelExecutor):
    """Implements only the abstract methods, so the trait defaults are what is tested."""

    def __init__(self):
        self.prefill_calls: list[PrefillInput] = []
        self.decode_calls: list[DecodeInput] = []

    def info(self) -> ModelInfo:
        return make_model_info()

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        self.prefill_calls.append(input)
        kv = FakeKv(f"p{len(self.prefill_calls)}")
        return PrefillOutput(logits=np.zeros((1, 1, 4)), kv_cache=kv)

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        self.decode_calls.append(input)
        kv = FakeKv(f"d{len(self.decode_calls)}")
        return DecodeOutput(logits=np.zeros((1, 4)), kv_cache=kv)

    def capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(
            max_batch_size=4,
            max_sequence_length=128,
            attention_mechanisms=[AttentionType.GROUPED_QUERY, AttentionType.PAGED],
            supports_dynamic_batching=True,
            supports_continuous_batching=True,
            supports_speculative_decoding=False,
            supports_tensor_parallelism=False,
            supports_pipeline_parallelism=False,
            supported_dtypes=[DataType.BF16, DataType.FP32],
            supported_devices=[Device.cpu(), Device.tpu(1)],
            memory_requirements=MemoryRequirements(1, 2, 3, 4),
        )

    def status(self) -> ExecutorStatus:
        return make_status()


# --- MemoryRequirements ---------------------------------------------------------------


def test_calculate_total_memory_matches_hand_sum():
    req = MemoryRequirements(
        parameter_memory=1000,
        activation_memory_per_token=10,
        kv_cache_memory_per_token=4,
        overhead_memory=7,
    )
    # tokens = 2 * 3 = 6; activations = 10 * 6 = 60; kv = 4 * 6 * 5 = 120.
    assert req.calculate_total_memory(2, 3, 5) == 1000 + 60 + 120 + 7 == 1187
    assert req.calculate_total_memory(0, 3, 5) == 1007


def test_calculate_total_memory_rejects_negative():
    with pytest.raises(InvalidRequestError, match="batch_size must be >= 0, got -1"):
        MemoryRequirements(0, 0, 0, 0).calculate_total_memory(-1, 1, 1)


# --- UnifiedBatch -----------------------------------------------------------------------


def test_unified_batch_counts():
    kv = FakeKv("a")
    batch = UnifiedBatch(
        items=[
            UnifiedBatchItem("a", [1, 2, 3, 4], kv, pos_offset=0, is_final_chunk=False),
            UnifiedBatchItem("b", [9], kv, pos_offset=17, is_final_chunk=True),
            UnifiedBatchItem("c", [5, 6], kv, pos_offset=4, is_final_chunk=True),
        ]
    )
    assert batch.total_q_tokens() == 4 + 1 + 2
    assert batch.num_sampled_items() == 2
    assert UnifiedBatch().total_q_tokens() == 0
    assert UnifiedBatch().num_sampled_items() == 0


def test_unified_batch_item_repr_summarises_tokens():
    item = UnifiedBatchItem("seq-1", [1, 2, 3], FakeKv("x"), pos_offset=5, is_final_chunk=True)
    assert repr(item) == (
        "UnifiedBatchItem(seq_id='seq-1', q_len=3, pos_offset=5, is_final_chunk=True)"
    )


# --- PrefillOutput.last_token_logits -----------------------------------------------------


def test_last_token_logits_picks_last_position():
    logits = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = PrefillOutput(logits=logits, kv_cache=FakeKv("k"))
    last = out.last_token_logits()
    # Row b, position 2 starts at b*12 + 2*4.
    np.testing.assert_array_equal(last, [[8, 9, 10, 11], [20, 21, 22, 23]])
    assert last.shape == (2, 4)


def test_last_token_logits_rejects_non_3d():
    out = PrefillOutput(logits=np.zeros((2, 4)), kv_cache=FakeKv("k"))
    expected = r"Expected 3D logits tensor \[batch, seq, vocab\], got shape \(2, 4\)"
    with pytest.raises(BackendError, match=expected):
        out.last_token_logits()


def test_last_token_logits_rejects_empty_sequence():
    out = PrefillOutput(logits=np.zeros((2, 0, 4)), kv_cache=FakeKv("k"))
    with pytest.raises(BackendError, match="Empty sequence") as exc:
        out.last_token_logits()
    assert exc.value.kind is ErrorKind.BACKEND


# --- PrefillInput / DecodeInput ----------------------------------------------------------


def test_prefill_input_with_methods_return_new_objects():
    ids = np.array([[1, 2, 3]])
    base = PrefillInput(ids)
    kv, mask, pos = FakeKv("k"), np.ones((1, 3)), np.arange(3)[None]

    with_kv = base.with_kv_cache(kv)
    with_mask = base.with_attention_mask(mask)
    with_pos = base.with_position_ids(pos)

    assert with_kv is not base and with_kv.kv_cache is kv
    assert with_mask is not base and with_mask.attention_mask is mask
    assert with_pos is not base and with_pos.position_ids is pos
    assert base.kv_cache is None and base.attention_mask is None and base.position_ids is None
    chained = base.with_kv_cache(kv).with_position_ids(pos)
    assert chained.kv_cache is kv and chained.position_ids is pos and chained.input_ids is ids


def test_prefill_input_shapes():
    two_d = PrefillInput(np.zeros((3, 5), dtype=np.int32))
    assert (two_d.batch_size(), two_d.sequence_length()) == (3, 5)
    one_d = PrefillInput(np.zeros((4,), dtype=np.int32))
    assert (one_d.batch_size(), one_d.sequence_length()) == (4, 1)
    assert PrefillInput([[1, 2], [3, 4], [5, 6]]).sequence_length() == 2


def test_batch_size_of_scalar_input_is_an_error():
    with pytest.raises(InvalidRequestError, match=r"got shape \(\)"):
        PrefillInput(np.int32(7)).batch_size()


def test_decode_input():
    ids = np.zeros((6, 1))
    base = DecodeInput(ids, FakeKv("k"))
    pos = np.full((6, 1), 9)
    moved = base.with_position_ids(pos)
    assert moved is not base and moved.position_ids is pos and base.position_ids is None
    assert base.batch_size() == 6


# --- ModelExecutor defaults ---------------------------------------------------------------


def test_batch_prefill_default_is_serial_prefill():
    ex = CountingExecutor()
    inputs = [PrefillInput(np.zeros((1, n))) for n in (1, 2, 3)]
    outputs = asyncio.run(ex.batch_prefill(inputs))
    assert ex.prefill_calls == inputs
    assert [o.kv_cache.cache_id for o in outputs] == ["p1", "p2", "p3"]
    assert ex.decode_calls == []


def test_batch_decode_and_forward_verify_default_to_serial_decode():
    ex = CountingExecutor()
    kv = FakeKv("k")
    inputs = [DecodeInput(np.zeros((1, 1)), kv) for _ in range(2)]
    outputs = asyncio.run(ex.batch_decode(inputs))
    assert [o.kv_cache.cache_id for o in outputs] == ["d1", "d2"]
    outputs = asyncio.run(ex.forward_verify(inputs + inputs[:1]))
    assert [o.kv_cache.cache_id for o in outputs] == ["d3", "d4", "d5"]
    assert len(ex.decode_calls) == 5 and ex.prefill_calls == []


def test_unified_decode_and_forward_are_unsupported_by_default():
    ex = CountingExecutor()
    with pytest.raises(UnsupportedError, match="unified_decode not implemented for this executor"):
        asyncio.run(ex.unified_decode(UnifiedBatch()))
    with pytest.raises(UnsupportedError, match="Full forward pass not supported") as exc:
        asyncio.run(ex.forward(np.zeros((1, 2))))
    assert exc.value.kind is ErrorKind.UNSUPPORTED
    assert isinstance(exc.value, FerrumError)


def test_noop_defaults():
    ex = CountingExecutor()

    async def run_all():
        return (
            await ex.truncate_kv(FakeKv("k", 10), 4),
            await ex.warmup(),
            await ex.shutdown(),
        )

    assert asyncio.run(run_all()) == (None, None, None)
    assert ex.release_cache("k") is None
    assert ex.prefill_calls == [] and ex.decode_calls == []


def test_executor_without_abstract_methods_cannot_be_built():
    class Incomplete(ModelExecutor):
        def info(self):
            return make_model_info()

    with pytest.raises(TypeError):
        Incomplete()


def test_kv_handle_repr():
    assert repr(FakeKv("seq-3", 12)) == "FakeKv(cache_id='seq-3', num_tokens=12)"


# --- Registry ------------------------------------------------------------------------


def test_registry_register_get_remove_list():
    reg = InMemoryExecutorRegistry()
    a, b = CountingExecutor(), CountingExecutor()
    reg.register("zeta", a)
    reg.register("alpha", b)
    assert reg.list_names() == ["alpha", "zeta"]
    assert reg.get("zeta") is a
    assert reg.get("missing") is None
    with pytest.raises(InvalidRequestError, match="'zeta'"):
        reg.register("zeta", b)
    assert reg.get("zeta") is a
    assert reg.remove("zeta") is a
    assert reg.remove("zeta") is None
    assert reg.list_names() == ["alpha"]


def test_registry_metrics_derived_from_status():
    reg = InMemoryExecutorRegistry()
    reg.register("ex", CountingExecutor())
    m = reg.get_metrics("ex")
    assert (m.total_operations, m.prefill_operations, m.decode_operations) == (10, 3, 7)
    assert (m.avg_prefill_latency, m.avg_decode_latency) == (12.5, 2.0)
    assert math.isnan(m.p95_prefill_latency) and math.isnan(m.p95_decode_latency)
    assert m.memory_efficiency == 50 / 200
    assert (m.throughput_tps, m.batch_utilization) == (0.0, 0.0)
    assert reg.get_metrics("missing") is None


def test_registry_metrics_with_zero_allocation():
    class Empty(CountingExecutor):
        def status(self):
            return make_status(allocated=0, used=0)

    reg = InMemoryExecutorRegistry()
    reg.register("ex", Empty())
    assert reg.get_metrics("ex").memory_efficiency == 0.0


def test_registry_prefers_executor_metrics():
    own = ExecutorMetrics(5, 2, 3, 1.0, 2.0, 3.0, 4.0, 100.0, 0.5, 0.75)

    class WithMetrics(CountingExecutor):
        def metrics(self):
            return own

    reg = InMemoryExecutorRegistry()
    reg.register("ex", WithMetrics())
    assert reg.get_metrics("ex") is own


# --- DataType / Device ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("float32", DataType.FP32),
        ("fp32", DataType.FP32),
        ("f32", DataType.FP32),
        ("float16", DataType.FP16),
        ("fp16", DataType.FP16),
        ("half", DataType.FP16),
        ("bfloat16", DataType.BF16),
        ("BF16", DataType.BF16),
        (" bf16 ", DataType.BF16),
        ("fp8", DataType.FP8),
        ("int8", DataType.INT8),
        ("int4", DataType.INT4),
    ],
)
def test_datatype_from_str(text, expected):
    assert DataType.from_str(text) is expected


def test_datatype_from_str_unknown():
    with pytest.raises(InvalidConfigError, match="dtype 'float64'; accepted values: .*bf16"):
        DataType.from_str("float64")


def test_datatype_sizes_and_names():
    assert [d.bits() for d in DataType] == [32, 16, 16, 8, 8, 4]
    assert DataType.INT4.size_in_bytes() == 0.5
    assert DataType.BF16.size_in_bytes() == 2
    assert DataType.BF16.to_jax_dtype_name() == "bfloat16"
    assert DataType.FP32.to_jax_dtype_name() == "float32"
    assert np.dtype(DataType.FP16.to_jax_dtype_name()) == np.float16


def test_device():
    assert str(Device.cuda(1)) == "cuda:1"
    assert str(Device.cpu()) == "cpu:0"
    assert Device.tpu(2) == Device("tpu", 2)
    with pytest.raises(InvalidConfigError, match="'gpu'"):
        Device("gpu")
    with pytest.raises(InvalidConfigError, match="got -1"):
        Device.cuda(-1)


# --- Config validation ------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = ExecutorConfig(model_info=make_model_info())
    assert cfg.attention_config.attention_type is AttentionType.GROUPED_QUERY
    assert cfg.attention_config.enable_paged_attention and cfg.attention_config.block_size == 16
    assert cfg.memory_config.max_memory_usage == 0.9
    assert cfg.optimization_config.optimization_level == 2
    with pytest.raises(InvalidConfigError, match=r"max_memory_usage must be in \(0, 1\], got 1.5"):
        ExecutorMemoryConfig(max_memory_usage=1.5)
    with pytest.raises(InvalidConfigError, match="optimization_level must be in 0..3, got 4"):
        OptimizationConfig(optimization_level=4)
    with pytest.raises(InvalidConfigError, match="max_batch_size must be >= 1, got 0"):
        ExecutorConfig(model_info=make_model_info(), max_batch_size=0)


# --- Serialisation ----------------------------------------------------------------------


def test_to_dict_is_json_safe():
    ex = CountingExecutor()
    caps = ex.capabilities().to_dict()
    assert caps["attention_mechanisms"] == ["GroupedQuery", "Paged"]
    assert caps["supported_dtypes"] == ["bfloat16", "float32"]
    assert caps["supported_devices"] == ["cpu:0", "tpu:1"]
    assert caps["memory_requirements"]["overhead_memory"] == 4

    status = ex.status().to_dict()
    assert status["state"] == "Ready"
    assert "last_operation" not in status

    cfg = ExecutorConfig(
        model_info=make_model_info(),
        executor_options={"page_count": np.int64(64), "tags": ("a", "b")},
    ).to_dict()
    assert cfg["model_info"]["device"] == "cuda:0"
    assert cfg["executor_options"] == {"page_count": 64, "tags": ["a", "b"]}

    reg = InMemoryExecutorRegistry()
    reg.register("ex", ex)
    metrics = reg.get_metrics("ex").to_dict()
    assert metrics["p95_decode_latency"] is None

    for d in (caps, status, cfg, metrics, make_model_info().to_dict()):
        json.loads(json.dumps(d, allow_nan=False))


def test_to_dict_rejects_unserialisable_values():
    cfg = ExecutorConfig(model_info=make_model_info(), executor_options={"fn": print})
    with pytest.raises(InvalidRequestError, match="builtin_function_or_method"):
        cfg.to_dict()
