"""The Pallas GPU and TPU grouped matmuls (pallas_kernels.grouped_matmul) in the Pallas interpreter
against numpy: the weight dequantized by the test's own unpacking, contracted in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax.models.quantization import Quantization, quantize
from pallas_kernels.grouped_matmul import (
    grouped_block_sizes, grouped_block_sizes_tpu, grouped_matmul_gpu, grouped_matmul_tpu, layer_block_sizes, layer_matmul_gpu,
)


def numpy_weight(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`[K, N]` float64. int4 (uint8 bytes): each group's first half from the low nibbles, its
    second half from the high ones, times the group's step plus its offset; int8: codes times
    the group's scale."""
    groups, n = scale.shape[0], codes.shape[-1]
    if codes.dtype == np.int8:
        return (codes.reshape(groups, -1, n) * scale[:, None].astype(np.float64)).reshape(-1, n)
    b = codes.reshape(groups, -1, n).astype(np.int64)
    values = np.concatenate([b & 0xF, b >> 4], axis=1)
    return (values * scale[:, 0][:, None].astype(np.float64) + scale[:, 1][:, None]).reshape(-1, n)


CASES = [
    (1, 256, 128, 128),  # a decode row, padded to 16
    (5, 576, 192, 32),  # GGUF's groups of 32; 64-wide column blocks
    (40, 512, 48, 64),  # 16-wide column blocks
    (70, 256, 256, 128),  # two row blocks, the second mostly padding
]


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("m, k, n, group", CASES)
def test_grouped_kernel_equals_the_float_weight(method, m, k, n, group):
    rng = np.random.default_rng(m)
    w = rng.normal(size=(k, n)).astype(np.float32)
    codes, scale = (np.asarray(a) for a in jax.jit(lambda w: quantize(w, 1, Quantization(method, group)))(w))
    assert codes.dtype == (np.uint8 if method == "int4" else np.int8)
    x = rng.normal(size=(m, k)).astype(np.float32)
    y = grouped_matmul_gpu(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(scale), interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ numpy_weight(codes, scale), atol=3e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_grouped_kernel_bfloat16_rows_accumulate_in_float32(method):
    rng = np.random.default_rng(7)
    w = rng.normal(size=(512, 128)).astype(np.float32)
    codes, scale = jax.jit(lambda w: quantize(w, 1, Quantization(method, 128)))(w)
    x = jnp.asarray(rng.normal(size=(3, 512)), jnp.bfloat16)
    y = grouped_matmul_gpu(x, codes, scale, out_dtype=jnp.float32, interpret=True)
    want = np.asarray(x, np.float64) @ numpy_weight(np.asarray(codes), np.asarray(scale))
    # Codes are exact in bfloat16 and x is bfloat16 as given: only float32 accumulation differs.
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "n, group, packed, problem",
    [(128, 16, True, "group 16"), (128, 16, False, None), (128, 8, False, "group 8"), (24, 128, True, "output width 24"),
     (128, 96, True, "group 96")],
)  # fmt: skip
def test_grouped_block_sizes_refuse_what_the_kernel_cannot_tile(n, group, packed, problem):
    if problem is None:
        assert grouped_block_sizes(4, n, group, packed) == (16, 128)
        return
    with pytest.raises(ValueError, match=problem):
        grouped_block_sizes(4, n, group, packed)


def test_codes_that_do_not_match_the_scales_are_refused():
    x = jnp.zeros((2, 256), jnp.float32)
    with pytest.raises(ValueError, match="do not agree"):
        grouped_matmul_gpu(x, jnp.zeros((256, 64), jnp.uint8), jnp.zeros((2, 2, 64), jnp.float32), interpret=True)


@pytest.mark.parametrize("method, m, k, n, group", [("int4", 1, 512, 256, 128), ("int4", 20, 2048, 128, 32), ("int8", 5, 1024, 384, 32),
                                                    ("int8", 300, 256, 128, 32)])  # fmt: skip
def test_tpu_grouped_kernel_equals_the_float_weight(method, m, k, n, group):
    """The Mosaic kernel over TPU's forms (uint4 codes, grouped int8) in the Pallas interpreter;
    300 rows take two row blocks of 256."""
    from ferrum_jax.models import int4_codes

    rng = np.random.default_rng(m)
    w = rng.normal(size=(k, n)).astype(np.float32)
    codes, scale = (np.asarray(a) for a in jax.jit(lambda w: quantize(w, 1, Quantization(method, group)))(w))
    want = numpy_weight(codes, scale)
    if method == "int4":
        codes = jax.jit(lambda p: int4_codes.unpack(p, 0, 1, k // group))(codes)
    x = rng.normal(size=(m, k)).astype(np.float32)
    y = jax.jit(lambda x, c, s: grouped_matmul_tpu(x, c, s, interpret=True))(x, codes, scale)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ want, atol=3e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "k, n, group, packed, problem",
    [(4096, 14336, 128, True, None), (1536, 576, 32, True, "output width 576"), (4096, 4096, 8, True, "group 8"),
     (96, 128, 32, False, "no block")],
)  # fmt: skip
def test_tpu_block_sizes_refuse_what_the_kernel_cannot_tile(k, n, group, packed, problem):
    if problem is None:
        assert grouped_block_sizes_tpu(1, k, n, group, packed) == (16, 512, 2048)
        return
    with pytest.raises(ValueError, match=problem):
        grouped_block_sizes_tpu(1, k, n, group, packed)


@pytest.mark.parametrize("m, k, n", [(1, 256, 128), (16, 512, 4096), (40, 128, 48), (200, 128, 48)])
@pytest.mark.parametrize("form", ["bfloat16", "int8"])
def test_layer_kernel_reads_its_layer_of_the_stack(m, k, n, form):
    """pallas_kernels.grouped_matmul.layer_matmul_gpu: layer 2 of a stack of 3 against numpy, for
    bfloat16 weights and for int8 codes with a scale per output column; 200 rows are four
    row blocks of 64, the last padded."""
    rng = np.random.default_rng(m + n)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    if form == "bfloat16":
        stack, scale = jnp.asarray(rng.normal(size=(3, k, n)), jnp.bfloat16), None
        want_w = np.asarray(stack[2], np.float64)
    else:
        stack = jnp.asarray(rng.integers(-127, 128, size=(3, k, n)), jnp.int8)
        scale = jnp.asarray(rng.uniform(0.001, 0.01, size=(3, n)), jnp.float32)
        want_w = np.asarray(stack[2], np.float64) * np.asarray(scale[2], np.float64)
    y = layer_matmul_gpu(x, stack, jnp.int32(2), scale, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ want_w, rtol=1e-4, atol=1e-3)


def test_layer_kernel_leaves_many_rows_to_xla_and_widens_blocks_only_where_programs_stay_many():
    with pytest.raises(ValueError, match="at most 256"):
        layer_block_sizes(257, 4096, 4096)
    assert layer_block_sizes(256, 4096, 4096) == (64, 16)
    assert layer_block_sizes(1, 4096, 4096) == (16, 16)  # 256 programs over N = 4096
    assert layer_block_sizes(16, 4096, 14336) == (16, 32)  # 448 programs
    assert layer_block_sizes(3, 4096, 65536) == (16, 128)
