"""Suite-wide JAX setup, applied before any test imports jax.

- 8 fake CPU devices, so sharding code is testable without accelerators.
- A persistent compilation cache (`.cache/jax`, git-ignored) shared by every executor of
  the session, by server subprocesses and by later runs: many tests build executors with
  identical programs, and a hit costs milliseconds instead of seconds of XLA:CPU compile.
  Tests that count compilations switch it off for themselves.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def no_persistent_cache():
    """Programs compiled in the test stay out of the persistent cache: where a cache hit would
    hide a compile that is counted, and (test_tensor_parallel) where writing the entry crashed."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)
