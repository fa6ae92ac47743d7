"""Matmuls that read their weights in the kernel: group-wise quantized ones (int4, grouped int8)
over the codes, Triton for GPUs over packed nibbles (gpu_kernel.py), Mosaic for TPUs over XLA's
uint4 (tpu_kernel.py); and on GPUs one layer of a stacked float or per-channel int8 weight read
in place (layer_gpu_kernel.py)."""

from pallas_kernels.grouped_matmul.gpu_kernel import grouped_block_sizes, grouped_matmul_gpu
from pallas_kernels.grouped_matmul.layer_gpu_kernel import layer_block_sizes, layer_matmul_gpu
from pallas_kernels.grouped_matmul.tpu_kernel import grouped_block_sizes_tpu, grouped_matmul_tpu

__all__ = ["grouped_block_sizes", "grouped_block_sizes_tpu", "grouped_matmul_gpu", "grouped_matmul_tpu", "layer_block_sizes",
           "layer_matmul_gpu"]
