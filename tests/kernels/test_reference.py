"""The jnp reference against a naive per-sequence numpy loop."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from .cases import CASES, DEFAULT_CONFIG, OPTIONS, random_lens
from .ragged_batches import make_batch, naive_attention

# float32: the reference accumulates in float32 over <= 48 kv positions, so ~1e-6 error.
# bfloat16: inputs are identical bf16 values and math is float32, so only the final rounding to
# bfloat16 (relative 2**-8) separates it from the float64 oracle.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


@functools.cache
def _compiled(options):
  return jax.jit(lambda *a, sm_scale: ragged_paged_attention_reference(
      *a, sm_scale=sm_scale, **dict(options)), static_argnames="sm_scale")


def _check(batch, dtype, **options):
  sm_scale = batch.q.shape[-1] ** -0.5
  out = _compiled(tuple(sorted(options.items())))(*batch.args, sm_scale=sm_scale)
  assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
  out = np.asarray(out, np.float64)
  expected = naive_attention(batch, sm_scale=sm_scale, **options)
  n = batch.num_valid_tokens
  assert not np.isnan(out[:n]).any()
  assert np.all(out[n:] == 0)
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(out[:n], expected[:n], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases(name):
  lens, overrides = CASES[name]
  config = {**DEFAULT_CONFIG, **overrides}
  batch = make_batch(np.random.default_rng(0), lens, **config)
  _check(batch, config["dtype"])


@pytest.mark.parametrize("options", [*OPTIONS.values(), dict(soft_cap=2.0)])
def test_sliding_window_and_soft_cap(options):
  lens, _ = CASES["mixed"]
  batch = make_batch(np.random.default_rng(1), lens, **DEFAULT_CONFIG)
  _check(batch, "float32", **options)


def test_random_batches():
  rng = np.random.default_rng(2)
  for _ in range(4):
    batch = make_batch(rng, random_lens(rng, **DEFAULT_CONFIG), **DEFAULT_CONFIG)
    _check(batch, "float32")


def test_bucket_larger_than_one_chunk():
  config = {**DEFAULT_CONFIG, "num_tokens": 150, "num_seqs_max": 8, "pages_per_seq": 8}
  lens = [(40, 60), (1, 33), (64, 64), (0, 0), (21, 50), (1, 1)]
  _check(make_batch(np.random.default_rng(4), lens, **config), "float32")


def test_dynamic_num_seqs_reuses_compilation():
  lens, _ = CASES["mixed"]
  batch = make_batch(np.random.default_rng(3), lens, **DEFAULT_CONFIG)
  fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="reference"))
  full = fn(*batch.args)
  fewer = fn(*batch.args[:-1], jnp.asarray(2, jnp.int32))
  assert fn._cache_size() == 1
  n = int(batch.cu_q_lens[2])
  np.testing.assert_array_equal(np.asarray(fewer[:n]), np.asarray(full[:n]))
  assert np.all(np.asarray(fewer[n:]) == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads=6"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(soft_cap=0.0), "soft_cap=0.0"),
])
def test_bad_static_arguments(kwargs, message):
  num_q_heads = kwargs.pop("num_q_heads", 4)
  num_kv_heads = kwargs.pop("num_kv_heads", 2)
  q = jnp.zeros((8, num_q_heads, 64))
  pages = jnp.zeros((num_kv_heads, 4, 8, 64))
  tables = (jnp.zeros(2, jnp.int32), jnp.zeros((2, 2), jnp.int32), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=message):
    ragged_paged_attention_reference(q, pages, pages, *tables, jnp.asarray(1), sm_scale=1.0,
                                     **kwargs)


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend='cuda'"):
    ragged_paged_attention(*[None] * 7, sm_scale=1.0, backend="cuda")
