"""Group-wise quantized matmul (int4, grouped int8) reading the codes in the kernel: Triton for
GPUs over packed nibbles (gpu_kernel.py), Mosaic for TPUs over XLA's uint4 (tpu_kernel.py)."""

from pallas_kernels.grouped_matmul.gpu_kernel import grouped_block_sizes, grouped_matmul_gpu
from pallas_kernels.grouped_matmul.tpu_kernel import grouped_block_sizes_tpu, grouped_matmul_tpu

__all__ = ["grouped_block_sizes", "grouped_block_sizes_tpu", "grouped_matmul_gpu", "grouped_matmul_tpu"]
