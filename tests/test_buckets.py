"""Shape buckets: every shape a step can take is one `warmup` compiles, and the server default's
program count is the hand count the bucket rules give."""

import itertools

import pytest

import ferrum_jax as fj
from ferrum_jax.batch.buckets import BucketSpec, StepShape


def test_server_default_program_count_by_hand():
    b = BucketSpec(max_num_batched_tokens=512, max_num_seqs=32, pages_per_seq=128)
    assert b.token_buckets == (16, 32, 64, 128, 256, 512)
    assert b.decode_buckets == (1, 2, 4, 8)
    assert b.step_seq_buckets(16) == (1, 4, 16) and b.step_seq_buckets(512) == (1, 4, 16, 32)
    # decode 4 + T=16: 3 + five larger T buckets x 4
    assert len(b.shapes(all_rows=False)) == 4 + 3 + 5 * 4
    assert b.row_buckets == (1, 2, 4, 8, 16, 32)


@pytest.mark.parametrize("max_tokens, max_seqs", [(512, 32), (64, 8), (32, 2), (2048, 256)])
def test_shape_for_always_lands_on_a_warmed_shape(max_tokens, max_seqs):
    b = BucketSpec(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs, pages_per_seq=8)
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
    b = BucketSpec(max_num_batched_tokens=512, max_num_seqs=32, pages_per_seq=8)
    assert b.shape_for(3, 3, False) == StepShape(4, 4, 4)
    assert b.shape_for(5, 3, False) == StepShape(16, 4, 4)
    assert b.shape_for(100, 5, False) == StepShape(128, 16, 16)


def test_over_the_limits_is_named():
    b = BucketSpec(max_num_batched_tokens=64, max_num_seqs=8, pages_per_seq=8)
    with pytest.raises(fj.InvalidRequestError, match="65 batched tokens in one step exceeds the limit 64"):
        b.shape_for(65, 1, False)
    with pytest.raises(fj.InvalidRequestError, match="9 sequences in one step exceeds the limit 8"):
        b.shape_for(20, 9, False)
