"""The Pallas GPU int4 matmul (pallas_kernels.int4_matmul) in the Pallas interpreter against
numpy: the weight dequantized by the test's own nibble unpacking, contracted in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax.models.quantization import Quantization, quantize
from pallas_kernels.int4_matmul import int4_block_sizes, int4_matmul_gpu


def numpy_int4_weight(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`[K, N]` float64: each group's first half from the low nibbles, its second half from the
    high ones, times the group's step plus its offset."""
    groups = scale.shape[0]
    b = packed.reshape(groups, -1, packed.shape[-1]).astype(np.int64)
    codes = np.concatenate([b & 0xF, b >> 4], axis=1)
    return (codes * scale[:, 0][:, None].astype(np.float64) + scale[:, 1][:, None]).reshape(-1, packed.shape[-1])


@pytest.mark.parametrize(
    "m, k, n, group",
    [
        (1, 256, 128, 128),  # a decode row, padded to 16
        (5, 576, 192, 32),  # GGUF's groups of 32 (16-row halves, tl.dot's minimum); 64-wide column blocks
        (40, 512, 48, 64),  # 16-wide column blocks
        (70, 256, 256, 128),  # two row blocks, the second mostly padding
    ],
)
def test_int4_kernel_equals_the_float_weight(m, k, n, group):
    rng = np.random.default_rng(m)
    w = rng.normal(size=(k, n)).astype(np.float32)
    packed, scale = (np.asarray(a) for a in jax.jit(lambda w: quantize(w, 1, Quantization("int4", group)))(w))
    x = rng.normal(size=(m, k)).astype(np.float32)
    y = int4_matmul_gpu(jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scale), interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ numpy_int4_weight(packed, scale), atol=2e-4, rtol=1e-5)


def test_int4_kernel_bfloat16_rows_accumulate_in_float32():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(512, 128)).astype(np.float32)
    packed, scale = jax.jit(lambda w: quantize(w, 1, Quantization("int4", 128)))(w)
    x = jnp.asarray(rng.normal(size=(3, 512)), jnp.bfloat16)
    y = int4_matmul_gpu(x, packed, scale, out_dtype=jnp.float32, interpret=True)
    want = np.asarray(x, np.float64) @ numpy_int4_weight(np.asarray(packed), np.asarray(scale))
    # bfloat16 codes are exact (0..15) and x is bfloat16 as given: only float32 accumulation differs.
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("m, n, group, problem", [(4, 128, 16, "group 16"), (4, 24, 128, "output width 24"), (4, 128, 96, "group 96")])
def test_int4_block_sizes_refuse_what_the_kernel_cannot_tile(m, n, group, problem):
    with pytest.raises(ValueError, match=problem):
        int4_block_sizes(m, n, group)
