"""The XLA:CPU custom call of cpu_kernel.cc: per-token ragged paged attention over the pages in place.

Built and registered on first use (pallas_kernels.cpu_build); without a C++ compiler the XLA path
runs unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import register_cpu_kernel


@functools.cache
def target_name() -> str | None:
    """Registers the kernel with XLA:CPU (building it if needed); its FFI target name, or None
    when it cannot be built here."""
    return register_cpu_kernel(Path(__file__).with_name("cpu_kernel.cc"), "FerrumRaggedPagedAttentionCpu",
                               "ferrum_rpa_cpu", "CPU attention kernel")


def kernel_supports(q_shape, k_shape, q_dtype, k_dtype) -> bool:
    """What cpu_kernel.cc computes: float32 queries over float32 or int8 pages, at most 16 query
    heads per kv head, head_dim a multiple of 8 up to 256 (its eight-lane vectors and fixed
    per-token buffers)."""
    group, head_dim = q_shape[1] // k_shape[0], q_shape[2]
    return (q_dtype == jnp.float32 and k_dtype in (jnp.float32, jnp.int8) and group <= 16 and head_dim <= 256
            and head_dim % 8 == 0)


def ragged_paged_attention_cpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, select,
                               *, sm_scale, sliding_window=None, soft_cap=None):
    """Attention of the tokens of sequences with `select[s]` true (float32 out; the rest come out
    zero); arguments as in reference.py, int8 pages read as their integer values. Callers check `target_name()` and `kernel_supports`."""
    name = target_name()
    if name is None:
        raise RuntimeError("the CPU attention kernel is not available on this host")
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, jnp.reshape(num_seqs, (1,)),
                select.astype(jnp.int32), sm_scale=np.float32(sm_scale),
                soft_cap=np.float32(soft_cap or 0.0), sliding_window=np.int32(sliding_window or 0))
