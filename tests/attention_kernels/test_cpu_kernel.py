"""The XLA:CPU custom call for decode tokens (cpu_kernel.cc): against the numpy oracle on long
paged contexts, in the compiled step, and absent without a compiler."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.cpu_kernel import kernel_supports, target_name
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla
from .ragged_batches import make_batch, naive_attention


@pytest.mark.parametrize("options", [{}, dict(sliding_window=100), dict(soft_cap=3.0)])
@pytest.mark.parametrize("page_size", [16, 128])
def test_long_decode_contexts_against_the_oracle(page_size, options):
  """Decodes at 1 to 1500 positions over shuffled pages (page 128: more keys than one softmax
  update takes), GQA 3 like the default model, beside a prefill chunk the XLA blocks take."""
  rng = np.random.default_rng(7)
  config = dict(num_tokens=48, num_seqs_max=12, page_size=page_size, pages_per_seq=2048 // page_size,
                num_q_heads=9, num_kv_heads=3, head_dim=64, dtype="float32")
  lens = [(1, int(kv)) for kv in rng.integers(1, 1500, 10)] + [(1, 1), (20, 700)]
  batch = make_batch(rng, lens, **config)
  assert kernel_supports(batch.q.shape, batch.k_pages.shape, batch.q.dtype, batch.k_pages.dtype)
  out = jax.jit(lambda *a: ragged_paged_attention_xla(*a, sm_scale=0.125, cpu_kernel=True, **options))(*batch.args)
  expected = naive_attention(batch, sm_scale=0.125, **options)
  n = batch.num_valid_tokens
  np.testing.assert_allclose(np.asarray(out)[:n], expected[:n], atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(out)[n:] == 0)


def test_decode_step_reads_the_pages_through_the_custom_call():
  """Compiled for a decode bucket, the step holds the kernel's custom call and gathers no page:
  what made the XLA path slow at decode is gone from the program."""
  assert target_name() is not None
  k = jnp.zeros((3, 4097, 16, 64), jnp.float32)
  args = (jnp.zeros((32, 9, 64), jnp.float32), k, k, jnp.zeros(32, jnp.int32), jnp.zeros((32, 128), jnp.int32),
          jnp.zeros(33, jnp.int32), jnp.zeros((), jnp.int32))
  hlo = jax.jit(lambda *a: ragged_paged_attention_xla(*a, sm_scale=0.125, cpu_kernel=True)).lower(*args).compile().as_text()
  assert target_name() in hlo
  assert not re.search(r"= f32\[[^\]]*\]\S* gather\(", hlo)  # only index bookkeeping is gathered


def test_without_a_compiler_the_xla_path_runs(tmp_path):
  """No C++ compiler: one warning, no kernel, and the executor's backend keeps the XLA blocks."""
  code = (
      "import warnings\n"
      "from ferrum_jax.models.paged_attention import AttentionBackend\n"
      "with warnings.catch_warnings(record=True) as caught:\n"
      "    warnings.simplefilter('always')\n"
      "    assert AttentionBackend('xla').cpu_kernel is None\n"
      "assert any('CPU attention kernel unavailable' in str(w.message) for w in caught), caught\n"
  )
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), FERRUM_JAX_KERNEL_DIR=str(tmp_path),
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
  assert not list(tmp_path.glob("*.so"))
