"""Named compile targets and their compile-only devices, made on a CPU host without the chip.

TPU: libtpu (`jax[tpu]` at the project's jax version) describes a slice from its topology name;
jit-lowering onto those devices and `.compile()` run the real XLA:TPU and Mosaic compilers.
GPU: the jax-cuda12 plugin with ptxas (`nvidia-cuda-nvcc-cu12`) compiles for a GpuTargetConfig
(`gpu_specs/*.txtpb`, XLA's device descriptions with the fields jaxlib 0.10 does not know left
out), Pallas Triton kernels going through Triton -> PTX -> ptxas for the target's arch.

`hbm_bytes` is one chip's memory; `usable_fraction` the share a JAX process gets of it: on GPU
JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (0.75 unless set), on TPU the runtime hands
out all of HBM but keeps a little for itself, taken here as 5%.

`chip`: the chip's memory bandwidth and matmul peaks (ferrum_jax.chips), what the roofline
(aot.roofline) divides by.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from ferrum_jax.chips import CHIPS, Chip
from ferrum_jax.interfaces.errors import FerrumError

GiB = 1 << 30
_GPU_SPECS = Path(__file__).with_name("gpu_specs")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda"
    topology: str  # TPU topology name, or the GPU spec file's stem
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int
    chip: Chip

    @property
    def usable_bytes(self) -> int:
        if self.platform == "tpu":
            return int(self.hbm_bytes * 0.95)
        return int(self.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))

    def devices(self) -> list:
        """The target's compile-only devices, in the order a server's `jax.devices()` lists them."""
        return list(_devices(self))


TARGETS = {
    t.name: t
    for t in (
        Target("tpu-v5e-1", "tpu", "v5e:1x1", (1, 1, 1), 16 * GiB, CHIPS["v5e"]),
        Target("tpu-v5e-8", "tpu", "v5e:2x4", (2, 4, 1), 16 * GiB, CHIPS["v5e"]),
        Target("tpu-v6e-1", "tpu", "v6e:1x1", (1, 1, 1), 32 * GiB, CHIPS["v6e"]),
        Target("tpu-v6e-4", "tpu", "v6e:2x2", (2, 2, 1), 32 * GiB, CHIPS["v6e"]),
        Target("tpu-v6e-8", "tpu", "v6e:2x4", (2, 4, 1), 32 * GiB, CHIPS["v6e"]),
        # v5p-8: 4 chips of 2 TensorCores (megacore), one JAX device each.
        Target("tpu-v5p-8", "tpu", "v5p:2x2x1", (2, 2, 1), 95 * GiB, CHIPS["v5p"]),
        Target("gpu-h100", "cuda", "h100_sxm", (1, 1, 1), 80 * GiB, CHIPS["h100"]),
        Target("gpu-a100", "cuda", "a100_sxm_80", (1, 1, 1), 80 * GiB, CHIPS["a100"]),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise FerrumError.invalid_config(f"target {name!r} is not one of {sorted(TARGETS)}")
    return TARGETS[name]


@functools.lru_cache(maxsize=None)
def _devices(target: Target) -> tuple:
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, chips_per_host_bounds=target.chips_per_host
            )
        else:
            spec = (_GPU_SPECS / f"{target.topology}.txtpb").read_text()
            desc = topologies.get_topology_desc(platform="cuda", target_config=spec, topology="1x1x1")
    except Exception as e:  # missing libtpu / CUDA plugin raise RuntimeError, ImportError, XlaRuntimeError
        need = "libtpu (pip install 'jax[tpu]')" if target.platform == "tpu" else (
            "jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12"
        )
        raise FerrumError.unsupported(
            f"target {target.name}: no compile-only {target.platform} devices ({type(e).__name__}: {e}); needs {need}"
        ) from e
    return tuple(desc.devices)
