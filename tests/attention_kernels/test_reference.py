"""The jnp reference and the blocked XLA path against a naive per-sequence numpy loop."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference, ragged_paged_attention_xla
from pallas_kernels.ragged_paged_attention.xla import KV_BLOCK
from .cases import CASES, DEFAULT_CONFIG, OPTIONS, random_lens
from .ragged_batches import make_batch, naive_attention

IMPLS = {
    "reference": ragged_paged_attention_reference,
    "xla": ragged_paged_attention_xla,
    # decode tokens through the C++ custom call (cpu_kernel.cc), the rest through the XLA blocks
    "xla_cpu_kernel": functools.partial(ragged_paged_attention_xla, cpu_kernel=True),
}
# float32: both accumulate in float32 over <= 48 kv positions, so ~1e-6 error.
# bfloat16: inputs are identical bf16 values and math is float32, so only the final rounding to
# bfloat16 (relative 2**-8) separates it from the float64 oracle.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


@functools.cache
def _compiled(impl, options):
  return jax.jit(lambda *a, sm_scale: IMPLS[impl](
      *a, sm_scale=sm_scale, **dict(options)), static_argnames="sm_scale")


def _check(impl, batch, dtype, **options):
  sm_scale = batch.q.shape[-1] ** -0.5
  out = _compiled(impl, tuple(sorted(options.items())))(*batch.args, sm_scale=sm_scale)
  assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
  out = np.asarray(out, np.float64)
  expected = naive_attention(batch, sm_scale=sm_scale, **options)
  n = batch.num_valid_tokens
  assert not np.isnan(out[:n]).any()
  assert np.all(out[n:] == 0)
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(out[:n], expected[:n], atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_cases(name, impl):
  lens, overrides = CASES[name]
  config = {**DEFAULT_CONFIG, **overrides}
  batch = make_batch(np.random.default_rng(0), lens, **config)
  _check(impl, batch, config["dtype"])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("options", [*OPTIONS.values(), dict(soft_cap=2.0)])
def test_sliding_window_and_soft_cap(options, impl):
  lens, _ = CASES["mixed"]
  batch = make_batch(np.random.default_rng(1), lens, **DEFAULT_CONFIG)
  _check(impl, batch, "float32", **options)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_random_batches(impl):
  rng = np.random.default_rng(2)
  for _ in range(4):
    batch = make_batch(rng, random_lens(rng, **DEFAULT_CONFIG), **DEFAULT_CONFIG)
    _check(impl, batch, "float32")


@pytest.mark.parametrize("impl", ["xla", "xla_cpu_kernel"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_seqs_max", [1, 2, 4, 32])
@pytest.mark.parametrize("name", ["prefill_only", "mixed", "q_longer_than_page", "zero_length_padding_inside", "full_bucket"])
def test_xla_query_blocks(name, num_seqs_max, window, impl):
  """The XLA path over one to 32 sequence slots: one-token blocks next to long chunks' blocks,
  sequences starting mid-block, blocks spilling past a page, a last block partly empty."""
  lens, overrides = CASES[name]
  lens = lens[:num_seqs_max]
  config = {**DEFAULT_CONFIG, **overrides, "num_seqs_max": num_seqs_max}
  batch = make_batch(np.random.default_rng(3), lens, **config)
  _check(impl, batch, config["dtype"], sliding_window=window)


@pytest.mark.parametrize("impl", ["xla", "xla_cpu_kernel"])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("num_seqs_max", [8, 4])
def test_xla_path_reads_no_block_outside_the_attended_range(window, num_seqs_max, impl):
  """Capacity 1024 positions, contexts of 300-400: every page outside the blocks any live token
  attends to (past the longest context's block, and with a window before the earliest attended
  block) is NaN. The XLA path must not read them (a read turns the output NaN), which is what
  makes its cost follow the real kv lengths instead of the capacity."""
  config = dict(DEFAULT_CONFIG, pages_per_seq=128, num_tokens=16, num_seqs_max=num_seqs_max)
  lens = [(1, 400), (3, 300), (5, 350)]
  batch = make_batch(np.random.default_rng(5), lens, **config)
  block = KV_BLOCK
  block_pages = block // config["page_size"]
  lo = 0 if window is None else min(max(0, kv - q - window + 1) for q, kv in lens) // block
  hi = -(-max(kv for _, kv in lens) // block)
  table = np.array(batch.page_indices)
  read = {int(p) for p in table[: len(lens), lo * block_pages : hi * block_pages].ravel()}
  poison = np.array([p not in read for p in range(batch.k_pages.shape[1])])
  # A kernel walking the whole capacity (or the window's prefix) would meet poisoned pages.
  assert poison[table[: len(lens), hi * block_pages :]].any()
  assert window is None or poison[table[: len(lens), : lo * block_pages]].any()
  k = jnp.where(poison[None, :, None, None], jnp.nan, batch.k_pages)
  v = jnp.where(poison[None, :, None, None], jnp.nan, batch.v_pages)
  args = (batch.q, k, v, *batch.args[3:])
  out = np.asarray(jax.jit(lambda *a: IMPLS[impl](*a, sm_scale=0.125, sliding_window=window))(*args))
  expected = naive_attention(batch, sm_scale=0.125, sliding_window=window)
  n = batch.num_valid_tokens
  np.testing.assert_allclose(out[:n], expected[:n], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "xla_cpu_kernel"])
@pytest.mark.parametrize("window", [None, 50])
def test_xla_groups_of_blocks(window, impl):
  """Enough of both kinds of query block for several groups each, every group walking its own kv
  range: 35 decodes and a 7-token chunk (one-token blocks, two groups), chunks of 200, 40 and 8
  tokens (QUERY_BLOCK blocks: 8 is the shortest sent there), contexts from 8 to 384 positions."""
  rng = np.random.default_rng(6)
  config = dict(DEFAULT_CONFIG, num_tokens=320, num_seqs_max=40, page_size=8, pages_per_seq=48)
  capacity = config["page_size"] * config["pages_per_seq"]
  lens = [(1, int(kv)) for kv in rng.integers(1, capacity + 1, 35)]
  lens += [(200, 384), (40, 40), (8, 300), (7, 8)]
  order = rng.permutation(len(lens))
  batch = make_batch(rng, [lens[i] for i in order], **config)
  _check(impl, batch, "float32", sliding_window=window)
