"""Group-wise int4 matmul over ferrum's packed nibbles (see gpu_kernel.py)."""

from pallas_kernels.int4_matmul.gpu_kernel import int4_block_sizes, int4_matmul_gpu

__all__ = ["int4_block_sizes", "int4_matmul_gpu"]
