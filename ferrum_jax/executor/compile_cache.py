"""The persistent XLA compilation cache, so a restarted server or notebook loads its step
programs instead of compiling them again.

Where: `$FERRUM_JAX_CACHE_DIR`, else `~/.cache/ferrum_jax/xla`. A cache the user already
configured (`jax_compilation_cache_dir` / `JAX_COMPILATION_CACHE_DIR`) wins. Every step
program is cached (minimum compile time 0): even the sub-second ones add up over the
bucket grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "FERRUM_JAX_CACHE_DIR"


def enable_persistent_cache() -> str:
    """Turns the cache on (idempotent); returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.environ.get(ENV) or str(Path.home() / ".cache" / "ferrum_jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
