"""Backend selection and block-size validation of the public entry point."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.dispatch import resolve_backend
from pallas_kernels.ragged_paged_attention.gpu_kernel import gpu_block_sizes
from pallas_kernels.ragged_paged_attention.tpu_kernel import tpu_block_sizes
from .cases import DEFAULT_CONFIG, MIXED
from .ragged_batches import make_batch


def test_auto_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_backend("auto", interpret=False) == "xla"
  assert resolve_backend("auto", interpret=True) == "tpu"
  assert resolve_backend("gpu", interpret=True) == "gpu"


@pytest.mark.parametrize("platform, kernel", [("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("cpu", "xla")])
def test_auto_follows_the_compile_platform_not_the_default_backend(platform, kernel):
  # An ahead-of-time compile on this CPU host for a TPU/GPU target names the target's platform.
  assert resolve_backend("auto", interpret=False, platform=platform) == kernel


def test_auto_matches_xla_and_ignores_unused_block_sizes():
  batch = make_batch(np.random.default_rng(0), MIXED, **DEFAULT_CONFIG)
  auto = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, kv_splits=2,
                                                    pages_per_block=3))(*batch.args)
  ref = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="xla"))(
      *batch.args)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))


def _args():
  q = jnp.zeros((8, 4, 64))
  pages = jnp.zeros((2, 4, 8, 64))
  return (q, pages, pages, jnp.zeros(2, jnp.int32), jnp.zeros((2, 2), jnp.int32),
          jnp.zeros(3, jnp.int32), jnp.asarray(1, jnp.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(block_q=8), "block_q"),
    (dict(backend="tpu", queries_per_block=12), "queries_per_block=12"),
    (dict(backend="tpu", pages_per_block=3), r"pages_per_block=3 must be in \[1, pages_per_seq=2"),
    (dict(backend="gpu", queries_per_block=2), "queries_per_block=2"),
    (dict(backend="gpu", pages_per_block=3), "pages_per_block=3"),
    (dict(backend="gpu", kv_splits=0), "kv_splits=0"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ragged_paged_attention(*_args(), sm_scale=1.0, **kwargs)


def test_gpu_rejects_non_power_of_two_shapes():
  with pytest.raises(ValueError, match="head_dim=96"):
    gpu_block_sizes(16, 2, 2, 16, 4, 96)
  with pytest.raises(ValueError, match="page_size=24"):
    gpu_block_sizes(16, 2, 2, 24, 4, 128)


def test_default_block_sizes():
  assert tpu_block_sizes(256, 16, 64) == (32, 32)
  assert tpu_block_sizes(5, 16, 8) == (8, 8)
  # Decode batch with long contexts: few programs, so the GPU kernel splits the kv range.
  assert gpu_block_sizes(64, 8, 4, 16, 256, 128) == (8, 4, 4)
  assert gpu_block_sizes(4096, 8, 4, 16, 256, 128) == (8, 4, 1)
