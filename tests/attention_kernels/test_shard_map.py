"""The kernels inside shard_map, the way tensor parallelism calls them (kv heads on axis 0).

shard_map must be given check_vma=False around these pallas_calls. The mesh is two-way when the
suite provides fake CPU devices (tests/conftest.py does) and one-way otherwise.
"""

import numpy as np
import pytest
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import ragged_paged_attention
from .cases import DEFAULT_CONFIG, MIXED
from .ragged_batches import make_batch

# q, k_pages, v_pages sharded by head; the metadata replicated.
SPECS = (P(None, "tp"), P("tp"), P("tp"), P(), P(), P(), P())


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_inside_shard_map(backend):
  batch = make_batch(np.random.default_rng(0), MIXED, **DEFAULT_CONFIG)
  num_shards = min(2, len(jax.devices()), DEFAULT_CONFIG["num_kv_heads"])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_shards]), ("tp",))
  args = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(batch.args, SPECS)]
  sharded = jax.shard_map(
      lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend=backend, interpret=True),
      mesh=mesh, in_specs=SPECS, out_specs=P(None, "tp"), check_vma=False)
  out = jax.jit(sharded)(*args)
  ref = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="reference"))(
      *batch.args)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
