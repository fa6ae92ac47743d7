"""Builds and registers the XLA:CPU custom calls written in C++ (the FFI kernels beside this file).

A kernel's source ships with the package and is compiled on first use with the host's C++
compiler (`$CXX`, else `c++`) against the XLA FFI headers jaxlib ships, into
`$FERRUM_JAX_KERNEL_DIR` (else `~/.cache/ferrum_jax/kernels`), one shared object per source,
compiler flags and host CPU, so a restart or a second process loads it (~3 s to compile once).
It registers as an FFI target whose name carries that key: a compiled step program names the
kernel build it was compiled against, and a persistent-cache entry of an older build is never
run against a newer one. Without a compiler the load fails once with a warning and the caller
keeps its XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax

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


def _build_key(source: Path) -> str:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(_FLAGS).encode(), _host_cpu().encode(),
                 platform.machine().encode(), jax.ffi.include_dir().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _compile(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(built)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent process sees a whole file or none


def register_cpu_kernel(source: Path, symbol: str, prefix: str, what: str) -> str | None:
    """Registers the handler `symbol` of `source` with XLA:CPU (building it if needed) as
    `{prefix}_{build key}`; that name, or None with a warning naming `what` when it cannot be built."""
    name = f"{prefix}_{_build_key(source)}"
    kernel_dir = Path(os.environ.get(KERNEL_DIR_ENV) or Path.home() / ".cache" / "ferrum_jax" / "kernels")
    library = kernel_dir / f"{name}.so"
    try:
        if not library.exists():
            _compile(source, library)
        handler = getattr(ctypes.cdll.LoadLibrary(str(library)), symbol)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"{what} unavailable ({detail}); using the XLA path", stacklevel=3)
        return None
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return name
