"""Compiled programs kept on disk by what they are, so a restart loads them without tracing.

JAX's persistent compilation cache is keyed by the lowered HLO, so even a hit first traces and
lowers the program: ~0.35 s per step program for the default model on this 2-core machine, 11 s
of a warm restart's warmup for the server's 33 programs. This store keys each compiled
executable by everything that determines it instead — the source of `ferrum_jax` and
`pallas_kernels`, the jax and jaxlib versions, the devices, `XLA_FLAGS`, the caller's static
description (model config, attention backend, program kind) and the abstract arguments (tree
structure, shapes, dtypes, shardings) — and holds the serialized executable
(`jax.experimental.serialize_executable`), so a warm restart deserializes in milliseconds.

Compiling ahead of time (`lower(...).compile()`) also means warmup never runs a program, where
calling the jitted step on dummy batches executed each one (9 s of the warmup above).

The store lives in `programs/` under the XLA cache directory and follows the same switch
(`jax_enable_compilation_cache`). Only programs XLA compiled in this call are stored: one that
XLA's own cache handed back cannot be serialized again on XLA:CPU (the copy loses its compiled
functions: "NOT_FOUND: Function ... not found" when it runs), so it stays with that cache,
traced on every start as before. That includes an executable JAX's in-process cache returns
for a program compiled earlier in the process (another jit of the same function, or another
executor), which fires neither XLA event: the store requires XLA's own compile event. With several
processes (multi-host) the store is off and every process compiles for itself, because an
executable loaded on one host and compiled on another would be a divergence nobody could see. A file that fails to load (truncated, another jaxlib)
is logged, compiled again and replaced. Writes go through a temporary file and a rename, so
concurrent servers sharing a cache never read half a file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable

import jax
import jaxlib
from jax._src.config import enable_compilation_cache
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

_PACKAGES = ("ferrum_jax", "pallas_kernels")
STORE_HIT_EVENT = "/ferrum_jax/program_store/hit"


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 over every .py file of the packages that build programs."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _describe(args) -> str:
    """Tree structure plus shape, dtype and sharding of every leaf (host arrays: no sharding)."""
    leaves, treedef = jax.tree.flatten(args)
    parts = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{tuple(x.shape)}:{x.dtype}:{sharding!r}")
    return "\n".join(parts)


_in_process: dict[str, jax.stages.Compiled] = {}
_counts = threading.local()


def _count_xla_cache_hit(name: str, **_) -> None:
    if name == "/jax/compilation_cache/cache_hits":
        _counts.hits = _xla_cache_hits() + 1


def _count_backend_compile(name: str, _seconds: float, **_) -> None:
    if name == BACKEND_COMPILE_EVENT:
        _counts.compiles = _backend_compiles() + 1


def _backend_compiles() -> int:
    """XLA compiles (or XLA persistent-cache fetches) so far in this thread."""
    return getattr(_counts, "compiles", 0)


def _xla_cache_hits() -> int:
    """XLA persistent-cache hits so far in this thread (compiles report in their own thread)."""
    return getattr(_counts, "hits", 0)


jax.monitoring.register_event_listener(_count_xla_cache_hit)
jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def _calls_host(compiled: jax.stages.Compiled) -> bool:
    """Whether the program calls back into Python (Pallas interpret mode does): such an
    executable holds live Python objects, and serializing a sharded one crashed the process."""
    return re.search(r'custom_call_target="[^"]*callback', compiled.as_text()) is not None


def _execution_device_ids(compiled: jax.stages.Compiled) -> list[int] | None:
    """The devices the executable runs on, in its order; a loaded executable must get the same
    (by default it would be given every device of the backend). None where this jax does not
    expose them: such programs are compiled every time rather than loaded onto wrong devices."""
    try:
        return [d.id for d in compiled._executable.xla_executable.local_devices()]
    except AttributeError:
        return None


class ProgramStore:
    """`compile(fn, args, static)`: the executable of jitted `fn` at `args`, from disk if stored."""

    def __init__(self, xla_cache_dir: str | None, persistent: bool = True):
        """persistent False: neither this store nor XLA's cache keeps the programs (a
        several-device mesh on XLA:CPU, whose executables jaxlib 0.10 now and then segfaulted
        serializing for XLA's cache: three test-suite runs died so, in two tensor-parallel tests;
        CPU tensor parallelism is a development configuration, not a served one)."""
        enabled = persistent and bool(xla_cache_dir) and jax.config.jax_enable_compilation_cache and jax.process_count() == 1
        self.directory = Path(xla_cache_dir) / "programs" if enabled else None
        self.persistent = persistent

    def _key(self, args, static: str) -> str:
        devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
        context = [
            source_fingerprint(),
            jax.__version__,
            jaxlib.__version__,
            repr(devices),
            os.environ.get("XLA_FLAGS", ""),
            static,
            _describe(args),
        ]
        return hashlib.sha256("\n\n".join(context).encode()).hexdigest()

    def compile(self, fn: Callable, args: tuple, static: str) -> jax.stages.Compiled:
        if not self.persistent:
            with enable_compilation_cache(False):
                return fn.lower(*args).compile()
        if self.directory is None:
            return fn.lower(*args).compile()
        key = self._key(args, static)
        # One executable per key and process, shared by every executor that needs it (a draft
        # model equal to its target, tests): XLA:CPU failed to run a copy deserialized in the
        # process that had compiled the original ("Function ... not found").
        compiled = _in_process.get(key)
        if compiled is None:
            compiled = _in_process[key] = self._load_or_compile(fn, args, key)
        return compiled

    def _load_or_compile(self, fn: Callable, args: tuple, key: str) -> jax.stages.Compiled:
        path = self.directory / f"{key}.bin"
        if path.is_file():
            try:
                device_ids, payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                by_id = {d.id: d for d in jax.devices()}
                compiled = serialize_executable.deserialize_and_load(
                    payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids]
                )
                jax.monitoring.record_event(STORE_HIT_EVENT)
                return compiled
            except Exception as e:  # any unreadable entry is only a lost cache hit
                log.warning("program store: %s did not load (%s: %s); compiling again", path.name, type(e).__name__, e)
        hits_before, compiles_before = _xla_cache_hits(), _backend_compiles()
        compiled = fn.lower(*args).compile()
        device_ids = _execution_device_ids(compiled)
        # An executable XLA's own cache handed back serializes without its compiled functions
        # on XLA:CPU ("Function ... not found" when the loaded copy runs), so only a program
        # XLA compiled in this call is stored; one the XLA cache holds keeps loading from there.
        compiled_here = _backend_compiles() > compiles_before and _xla_cache_hits() == hits_before
        if device_ids is not None and compiled_here and not _calls_host(compiled):
            try:
                data = pickle.dumps((device_ids, *serialize_executable.serialize(compiled)))
            except Exception as e:  # host callbacks (Pallas interpret mode) and the like do not serialize
                log.debug("program store: %s is not serializable (%s: %s)", path.name, type(e).__name__, e)
            else:
                self._write(path, data)
        return compiled

    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(data)
            os.replace(f.name, path)
        except OSError as e:  # a read-only or full disk costs the next start a compile, nothing more
            log.warning("program store: could not write %s: %s", path, e)
