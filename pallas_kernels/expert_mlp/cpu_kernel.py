"""The XLA:CPU custom call of cpu_kernel.cc: the experts a step's tokens chose, read where they lie.

Built and registered on first use (pallas_kernels.cpu_build); without a C++ compiler callers keep
their XLA forms.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_build import register_cpu_kernel


@functools.cache
def target_name() -> str | None:
    """Registers the kernel with XLA:CPU (building it if needed); its FFI target name, or None
    when it cannot be built here."""
    return register_cpu_kernel(Path(__file__).with_name("cpu_kernel.cc"), "FerrumExpertMlpCpu", "ferrum_moe_cpu",
                               "CPU expert kernel")


def kernel_supports(x_dtype, stack_dtype, activation: str) -> bool:
    """What cpu_kernel.cc computes: float32 tokens and weights, SiLU-gated experts."""
    return x_dtype == jnp.float32 and stack_dtype == jnp.float32 and activation == "silu"


def expert_mlp_cpu(x_td, experts_tk, weights_tk, layer, gate_ledf, up_ledf, down_lefd) -> jax.Array:
    """`[tokens, hidden]` float32: per token the sum over its k picks of weight x
    `down(silu(x gate) * (x up))` of the picked expert of layer `layer` (a traced int32 scalar);
    picks outside `[0, experts)` add nothing. Callers check `target_name()` and `kernel_supports`."""
    name = target_name()
    if name is None:
        raise RuntimeError("the CPU expert kernel is not available on this host")
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x_td.shape, jnp.float32))
    return call(x_td, experts_tk.astype(jnp.int32), weights_tk.astype(jnp.float32),
                jnp.reshape(layer, (1,)).astype(jnp.int32), gate_ledf, up_ledf, down_lefd)
