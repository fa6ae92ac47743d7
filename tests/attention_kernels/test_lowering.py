"""Cross-lowering: the kernels lower for TPU and CUDA without either device present.

jax.export runs the Pallas-to-Mosaic and Pallas-to-Triton lowerings, so unsupported primitives,
bad block shapes and scalar-prefetch misuse fail here; the later device compilation (Mosaic's
layout passes, Triton's PTX generation) does not run and is not covered.
"""

import pytest
import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels import ragged_paged_attention

# Deliberately not powers of two: only Triton tiles must be, not whole arrays.
NUM_SEQS_MAX, PAGES_PER_SEQ, PAGE_SIZE, NUM_PAGES = 6, 12, 16, 50


def _specs(dtype, num_tokens=40, num_q_heads=8, num_kv_heads=2, head_dim=128):
  return (jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype),
          jax.ShapeDtypeStruct((num_kv_heads, NUM_PAGES, PAGE_SIZE, head_dim), dtype),
          jax.ShapeDtypeStruct((num_kv_heads, NUM_PAGES, PAGE_SIZE, head_dim), dtype),
          jax.ShapeDtypeStruct((NUM_SEQS_MAX,), jnp.int32),
          jax.ShapeDtypeStruct((NUM_SEQS_MAX, PAGES_PER_SEQ), jnp.int32),
          jax.ShapeDtypeStruct((NUM_SEQS_MAX + 1,), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.int32))


def _export(backend, options, specs):
  fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.08, backend=backend, **options))
  platform = {"tpu": "tpu", "gpu": "cuda"}[backend]
  # The Triton custom call carries no serialisation-compatibility guarantee; that only matters
  # for storing the artifact, not for checking that lowering succeeds.
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  return export.export(fn, platforms=[platform], disabled_checks=checks)(*specs)


@pytest.mark.parametrize("backend, marker", [("tpu", "tpu_custom_call"),
                                             ("gpu", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("dtype, options", [
    (jnp.bfloat16, {}),
    (jnp.float32, dict(sliding_window=128, soft_cap=30.0)),
])
def test_export(backend, marker, dtype, options):
  exported = _export(backend, options, _specs(dtype))
  module = exported.mlir_module()
  assert module and marker in module


def test_export_gpu_split_k_and_mqa():
  exported = _export("gpu", dict(kv_splits=4), _specs(jnp.bfloat16, num_tokens=16,
                                                      num_q_heads=6, num_kv_heads=1))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
