"""fp8 (e4m3) KV pages in all three attention implementations (both Pallas kernels in interpret
mode, and the XLA path), against the jnp reference run on the same pages widened to float32:
reading narrow pages must equal attending over their values exactly (float32 tolerance), and
the values themselves stay within fp8's rounding of the float pages (a stated, loose bound)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.gpu_kernel import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu_kernel import ragged_paged_attention_tpu
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla
from .cases import DEFAULT_CONFIG, MIXED
from .ragged_batches import make_batch

FP8 = jnp.float8_e4m3fn
IMPLEMENTATIONS = {
    "tpu": lambda *a, **k: ragged_paged_attention_tpu(*a, **k, queries_per_block=8, pages_per_block=2, interpret=True),
    "gpu": lambda *a, **k: ragged_paged_attention_gpu(*a, **k, queries_per_block=16, pages_per_block=2, kv_splits=1,
                                                      interpret=True),
    "xla": ragged_paged_attention_xla,
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_fp8_pages_read_as_their_float_values(impl):
  batch = make_batch(np.random.default_rng(4), MIXED, **DEFAULT_CONFIG)
  q, k, v, *rest = batch.args
  k8, v8 = k.astype(FP8), v.astype(FP8)
  sm_scale = q.shape[-1] ** -0.5
  out = jax.jit(lambda *a: IMPLEMENTATIONS[impl](*a, sm_scale=sm_scale))(q, k8, v8, *rest)
  widened = ragged_paged_attention_reference(q, k8.astype(q.dtype), v8.astype(q.dtype), *rest, sm_scale=sm_scale)
  full = ragged_paged_attention_reference(q, k, v, *rest, sm_scale=sm_scale)
  n = batch.num_valid_tokens
  assert out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out)[:n], np.asarray(widened)[:n], atol=1e-5, rtol=1e-5)
  # e4m3 keeps 3 mantissa bits (relative rounding <= 2**-4) on unit-normal K and V; the outputs,
  # averages of V rows, move by a few hundredths.
  assert np.abs(np.asarray(out)[:n] - np.asarray(full)[:n]).max() < 0.15
