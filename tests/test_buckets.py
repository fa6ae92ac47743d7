"""Shape buckets: every shape a step can take is one `warmup` compiles, and the program counts
are the hand counts the bucket rules and their cost model (batch.step_cost) give."""

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

import ferrum_jax as fj
from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.batch.step_cost import StepCost
from ferrum_jax.executor.platform_defaults import step_cost
from ferrum_jax.executor.program_plan import num_programs
from ferrum_jax.models.param_tree import abstract_model
from ferrum_jax.models.registry import model_config_from_dir

REPO = Path(__file__).resolve().parents[1]
# SmolLM2-135M (the default model) on a CPU: no ridge; a logit row is 576 x 49152 / 30 layers x
# (576 x 1536 + 3 x 576 x 1536) = 28.3e6 / 106.2e6 = 0.267 tokens of layer FLOPs.
CPU = StepCost(ridge_tokens=1.0, row_tokens=0.267)
# Rows that cost as much as a whole step: every bucket pays.
ROW_BOUND = StepCost(ridge_tokens=1.0, row_tokens=100.0)


def test_server_default_program_count_by_hand():
    b = BucketSpec(max_num_batched_tokens=512, max_num_seqs=32, pages_per_seq=128, cost=CPU)
    assert b.token_buckets == (16, 32, 64, 128, 256, 512)
    # Decode of 8 in (16, 16, 16): (16 + 16 x 0.267) / (8 + 8 x 0.267) = 2.0 > 1.02: pays.
    assert b.decode_buckets == (1, 2, 4, 8)
    # T=64: 4 vs 16 rows (64 + 16 x 0.267) / (64 + 4 x 0.267) = 1.049 pays; 1 vs 4:
    # (64 + 1.07) / (64 + 0.27) = 1.012 does not. T=512: 32 rows over 1 cost 8.3 / 512 = 1.6%.
    assert [b.step_seq_buckets(t, False) for t in b.token_buckets] == [
        (1, 4, 16), (1, 4, 16, 32), (4, 16, 32), (4, 16, 32), (4, 32), (32,)]  # fmt: skip
    assert len(b.shapes(all_rows=False)) == 4 + 3 + 4 + 3 + 3 + 2 + 1
    assert b.row_buckets == (1, 2, 4, 8, 16, 32)
    # Every-row steps pay by tokens alone: one sequence bucket each.
    assert all(b.step_seq_buckets(t, True) == (min(t, 32),) for t in b.token_buckets)
    every = BucketSpec(max_num_batched_tokens=512, max_num_seqs=32, pages_per_seq=128, cost=ROW_BOUND)
    assert len(every.shapes(all_rows=False)) == 4 + 3 + 5 * 4


def test_llama3_8b_on_a_tpu_is_one_program_per_token_bucket():
    """Llama-3-8B in bfloat16 on a v6e (918 TFLOP/s, 1640 GB/s): a step streams 16.06e9 bytes of
    weights (embedding included) in the time of 918e12 x 16.06e9 / 1640e9 / (2 x 6.98e9) = 644
    tokens' layer FLOPs, so every step up to 512 tokens costs the same whatever its rows: a
    1-sequence decode runs in the 16-token step, and each token bucket has one sequence bucket."""
    cfg = model_config_from_dir(REPO / "configs" / "models" / "llama-3-8b")
    _, state = abstract_model(cfg, "bfloat16", 1, None)
    cost = step_cost(cfg, state, SimpleNamespace(platform="tpu", device_kind="TPU v6 lite"))
    assert cost.ridge_tokens == pytest.approx(918e12 * 16.06e9 / 1640e9 / (2 * 6.98e9), rel=0.01)
    assert cost.row_tokens == pytest.approx(4096 * 128256 / 6.98e9, rel=0.01)
    b = BucketSpec(max_num_batched_tokens=2048, max_num_seqs=16, pages_per_seq=128, cost=cost)
    assert b.decode_buckets == () and b.row_buckets == (16,)
    assert b.shapes(all_rows=False) == [StepShape(t, 16, 16) for t in b.token_buckets]
    assert b.shape_for(1, 1, False) == StepShape(16, 16, 16)
    # The server's set (issue 26's start-up goal: 33 programs before, 137.9-169.5 s to compile for
    # a v6e here; 9 now): a step per token bucket and one sampler.
    assert num_programs(b, ("sample",)) == (8, 1, 0)
    # The same model on a CPU keeps its decode buckets.
    cpu = step_cost(cfg, state, SimpleNamespace(platform="cpu", device_kind="cpu"))
    assert cpu.ridge_tokens == 1.0
    assert BucketSpec(2048, 16, 128, cpu).decode_buckets == (1, 2, 4, 8)


@pytest.mark.parametrize("cost", [CPU, ROW_BOUND, StepCost(ridge_tokens=300.0, row_tokens=0.075)])
@pytest.mark.parametrize("max_tokens, max_seqs", [(512, 32), (64, 8), (32, 2), (2048, 256)])
def test_shape_for_always_lands_on_a_warmed_shape(max_tokens, max_seqs, cost):
    b = BucketSpec(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs, pages_per_seq=8, cost=cost)
    for all_rows in (False, True):
        warmed = set(b.shapes(all_rows))
        for tokens, seqs in itertools.product(range(1, max_tokens + 1), range(1, max_seqs + 1)):
            if seqs > tokens:
                continue
            shape = b.shape_for(tokens, seqs, all_rows)
            assert shape in warmed, (tokens, seqs, shape)
            assert shape.tokens >= tokens and shape.seqs >= seqs
            assert shape.logit_rows == (shape.tokens if all_rows else shape.seqs)


def test_a_decode_batch_below_sixteen_runs_at_its_own_size():
    b = BucketSpec(max_num_batched_tokens=512, max_num_seqs=32, pages_per_seq=8, cost=CPU)
    assert b.shape_for(3, 3, False) == StepShape(4, 4, 4)
    assert b.shape_for(5, 3, False) == StepShape(16, 4, 4)
    assert b.shape_for(100, 5, False) == StepShape(128, 16, 16)


def test_over_the_limits_is_named():
    b = BucketSpec(max_num_batched_tokens=64, max_num_seqs=8, pages_per_seq=8, cost=CPU)
    with pytest.raises(fj.InvalidRequestError, match="65 batched tokens in one step exceeds the limit 64"):
        b.shape_for(65, 1, False)
    with pytest.raises(fj.InvalidRequestError, match="9 sequences in one step exceeds the limit 8"):
        b.shape_for(20, 9, False)


def test_a_moe_decode_on_a_tpu_keeps_its_decode_buckets():
    """Qwen3-30B-A3B in bfloat16 on a v6e: 3.08e9 bytes of dense weights and 57.98e9 of experts
    against 2.72e9 active layer parameters. A decode of 8 tokens gathers 64 of the 128 experts
    (models.moe), half the expert stream: 317 + 0.5 x 5971 = 3303 tokens of time against the
    16-token step's 317 + 5971 = 6288, so every decode bucket pays (a dense model's do not)."""
    cfg = model_config_from_dir(REPO / "configs" / "models" / "qwen3-30b-a3b")
    _, state = abstract_model(cfg, "bfloat16", 1, None)
    cost = step_cost(cfg, state, SimpleNamespace(platform="tpu", device_kind="TPU v6 lite"))
    per_token = 918e12 / 1640e9 / (2 * 2_717_908_992)
    assert cost.ridge_tokens == pytest.approx(per_token * 2 * (30_532_122_624 - 28_991_029_248), rel=1e-6)
    assert cost.expert_ridge_tokens == pytest.approx(per_token * 2 * 28_991_029_248, rel=1e-6)
    assert cost.time(8, 8) == pytest.approx(cost.ridge_tokens + cost.expert_ridge_tokens / 2)
    b = BucketSpec(max_num_batched_tokens=512, max_num_seqs=16, pages_per_seq=256, cost=cost)
    assert b.decode_buckets == (1, 2, 4, 8) and b.shape_for(1, 1, False) == StepShape(1, 1, 1)
