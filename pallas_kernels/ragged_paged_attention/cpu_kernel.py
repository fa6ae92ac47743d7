"""The XLA:CPU custom call of cpu_kernel.cc: per-token ragged paged attention over the pages in place.

The C++ source ships with the package and is compiled on first use with the host's C++ compiler
(`$CXX`, else `c++`) against the XLA FFI headers jaxlib ships, into
`$FERRUM_JAX_KERNEL_DIR` (else `~/.cache/ferrum_jax/kernels`), one shared object per source,
compiler flags and host CPU, so a restart or a second process loads it (~3 s to compile once).
It registers as an FFI target whose name carries that key: a compiled step program names the
kernel build it was compiled against, and a persistent-cache entry of an older build is never
run against a newer one. Without a compiler the load fails once with a warning and the XLA path
runs unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_kernel.cc")
_SYMBOL = "FerrumRaggedPagedAttentionCpu"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
KERNEL_DIR_ENV = "FERRUM_JAX_KERNEL_DIR"


def _host_cpu() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _build_key() -> str:
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _host_cpu().encode(),
                 platform.machine().encode(), jax.ffi.include_dir().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _compile(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent process sees a whole file or none


@functools.cache
def target_name() -> str | None:
    """Registers the kernel with XLA:CPU (building it if needed); its FFI target name, or None
    when it cannot be built here."""
    key = _build_key()
    name = f"ferrum_rpa_cpu_{key}"
    kernel_dir = Path(os.environ.get(KERNEL_DIR_ENV) or Path.home() / ".cache" / "ferrum_jax" / "kernels")
    library = kernel_dir / f"{name}.so"
    try:
        if not library.exists():
            _compile(library)
        handler = getattr(ctypes.cdll.LoadLibrary(str(library)), _SYMBOL)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"CPU attention kernel unavailable ({detail}); using the XLA path", stacklevel=2)
        return None
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return name


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
