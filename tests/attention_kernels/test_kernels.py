"""Both Pallas kernels, run in interpret mode on CPU, against the jnp reference.

The TPU kernel runs under the TPU interpreter with race detection and NaN-filled scratch, so a
missing DMA wait, a wrong slot or a read of an unfetched page shows up as a race or a NaN. The
reference itself is checked against a numpy loop in test_reference.py.
"""

import functools

import numpy as np
import pytest
import jax

from pallas_kernels.ragged_paged_attention.gpu_kernel import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu_kernel import ragged_paged_attention_tpu
from .cases import CASES, DEFAULT_CONFIG, MIXED, OPTIONS, random_lens
from .ragged_batches import make_batch

try:
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _tpu_interpreter
except ImportError:  # Older jax keeps the TPU interpreter elsewhere; races then go unchecked.
  _tpu_interpreter = None

KERNELS = {"tpu": ragged_paged_attention_tpu, "gpu": ragged_paged_attention_gpu}
# Small blocks so the tiny test batches still span several query blocks and kv blocks, which is
# where double buffering, cross-sequence prefetch and the online softmax are exercised.
SMALL_BLOCKS = {"tpu": dict(queries_per_block=8, pages_per_block=2),
                "gpu": dict(queries_per_block=16, pages_per_block=2, kv_splits=1)}
# float32: kernel and reference both accumulate in float32 but in different orders (online vs
# two-pass softmax), a few ulps over <= 48 positions. bfloat16: the kernels feed bf16
# probabilities to the P.V matmul (as on the MXU / tensor cores) while the reference keeps them
# float32, so errors of a few bf16 ulps (2**-8 relative) of values of magnitude ~1 are expected.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


@functools.cache
def _compiled(backend, options, blocks):
  kernel = KERNELS[backend] if backend != "reference" else ragged_paged_attention_reference
  extra = dict(blocks) if backend != "reference" else {}
  if backend != "reference":
    extra["interpret"] = True
  return jax.jit(lambda *args, sm_scale: kernel(*args, sm_scale=sm_scale, **dict(options),
                                                **extra), static_argnames="sm_scale")


def _check(backend, batch, dtype, options=(), blocks=None):
  blocks = SMALL_BLOCKS[backend] if blocks is None else blocks
  sm_scale = batch.q.shape[-1] ** -0.5
  out = _compiled(backend, tuple(options), tuple(blocks.items()))(*batch.args, sm_scale=sm_scale)
  if backend == "tpu" and _tpu_interpreter is not None:
    assert not _tpu_interpreter.races.races_found, "TPU interpreter detected a race"
  expected = _compiled("reference", tuple(options), ())(*batch.args, sm_scale=sm_scale)
  assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
  out = np.asarray(out, np.float32)
  expected = np.asarray(expected, np.float32)
  n = batch.num_valid_tokens
  assert not np.isnan(out).any()
  assert np.all(out[n:] == 0), "padding rows must be exactly zero"
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(out[:n], expected[:n], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_cases(backend, name):
  lens, overrides = CASES[name]
  config = {**DEFAULT_CONFIG, **overrides}
  _check(backend, make_batch(np.random.default_rng(0), lens, **config), config["dtype"])


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sliding_window_and_soft_cap(backend, name):
  rng = np.random.default_rng(1)
  for lens in (MIXED, random_lens(rng, **DEFAULT_CONFIG)):
    batch = make_batch(rng, lens, **DEFAULT_CONFIG)
    _check(backend, batch, "float32", tuple(OPTIONS[name].items()))


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_random_batches(backend):
  rng = np.random.default_rng(2)
  for _ in range(4):
    batch = make_batch(rng, random_lens(rng, **DEFAULT_CONFIG), **DEFAULT_CONFIG)
    _check(backend, batch, "float32")


@pytest.mark.parametrize("backend, blocks", [
    ("tpu", {}),
    ("gpu", dict(kv_splits=3)),
    ("gpu", dict(queries_per_block=8, pages_per_block=4, kv_splits=2)),
])
def test_other_block_sizes(backend, blocks):
  rng = np.random.default_rng(3)
  for lens in (CASES["decode_only"][0], MIXED, random_lens(rng, **DEFAULT_CONFIG)):
    batch = make_batch(rng, lens, **DEFAULT_CONFIG)
    _check(backend, batch, "float32", blocks=blocks)
