"""Group-wise quantized matmul (int4 nibbles, grouped int8) on GPU (see gpu_kernel.py)."""

from pallas_kernels.grouped_matmul.gpu_kernel import grouped_block_sizes, grouped_matmul_gpu

__all__ = ["grouped_block_sizes", "grouped_matmul_gpu"]
