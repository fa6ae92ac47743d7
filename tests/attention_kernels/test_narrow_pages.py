"""Narrow KV pages, fp8 (e4m3) and int8, in all three attention implementations (both Pallas
kernels in interpret mode, and the XLA path with and without its CPU decode kernel), against the jnp reference run on the same pages
widened to float32: reading narrow pages must equal attending over their values exactly (float32
tolerance), and the values themselves stay within the type's rounding of the float pages (a
stated bound). Scales are applied as the model applies them (paged_attention.write_and_attend):
pages hold K / k_scale, the kernels see q * k_scale and their output is multiplied by v_scale."""

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

IMPLEMENTATIONS = {
    "tpu": lambda *a, **k: ragged_paged_attention_tpu(*a, **k, queries_per_block=8, pages_per_block=2, interpret=True),
    "gpu": lambda *a, **k: ragged_paged_attention_gpu(*a, **k, queries_per_block=16, pages_per_block=2, kv_splits=1,
                                                      interpret=True),
    "xla": ragged_paged_attention_xla,
    # decode tokens through cpu_kernel.cc: it reads int8 pages itself (fp8 stays on the XLA blocks)
    "xla_cpu_kernel": lambda *a, **k: ragged_paged_attention_xla(*a, **k, cpu_kernel=True),
}


# Largest output move from the float pages: e4m3 keeps 3 mantissa bits (relative rounding
# <= 2**-4), int8 rounds to 1/254 of each head's range; outputs are averages of V rows.
BOUNDS = {"float8_e4m3fn": 0.15, "int8": 0.03}


@pytest.mark.parametrize("dtype", sorted(BOUNDS))
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_narrow_pages_read_as_their_float_values(impl, dtype):
  batch = make_batch(np.random.default_rng(4), MIXED, **DEFAULT_CONFIG)
  q, k, v, *rest = batch.args
  dtype = jnp.dtype(dtype)
  limit = float(jnp.iinfo(dtype).max if dtype == jnp.int8 else jnp.finfo(dtype).max)
  # One scale per kv head, from the head's largest value, as kv.calibration sets them.
  k_scale, v_scale = (jnp.max(jnp.abs(x), axis=(1, 2, 3)) / limit for x in (k, v))
  group = q.shape[1] // k.shape[0]

  def narrow(x, scale):
    x = x / scale[:, None, None, None]
    return (jnp.round(x) if dtype == jnp.int8 else x).astype(dtype)

  k8, v8 = narrow(k, k_scale), narrow(v, v_scale)
  q_scaled = q * jnp.repeat(k_scale, group)[None, :, None]
  out_scale = jnp.repeat(v_scale, group)[None, :, None]
  sm_scale = q.shape[-1] ** -0.5
  out = jax.jit(lambda *a: IMPLEMENTATIONS[impl](*a, sm_scale=sm_scale))(q_scaled, k8, v8, *rest) * out_scale
  widened = ragged_paged_attention_reference(q_scaled, k8.astype(q.dtype), v8.astype(q.dtype), *rest,
                                             sm_scale=sm_scale) * out_scale
  full = ragged_paged_attention_reference(q, k, v, *rest, sm_scale=sm_scale)
  n = batch.num_valid_tokens
  assert out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out)[:n], np.asarray(widened)[:n], atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(out)[:n] - np.asarray(full)[:n]).max() < BOUNDS[dtype.name]
