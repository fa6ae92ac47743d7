"""Live-server fixtures for the serve tests: a real `python -m ferrum_jax.serve` subprocess
on a free loopback port, talked to over HTTP, killed at the end.

Every server of the suite uses the same engine limits (`SERVER_LIMITS`), so they compile
the same step programs: the first start compiles them, later starts load them from the
suite's persistent JAX compilation cache (`JAX_CACHE_DIR`: the one tests/conftest.py sets
up, kept across runs). The KV pool is deliberately small (`NUM_PAGES`: room
for about 2.5 full-length sequences of the 8 that may run), so concurrent load goes
through preemption and every test that checks greedy outputs also checks that
preemption does not change them.

`shared_server()` returns one server per argument list for the whole session, so the
test modules that want the default server share one process (there is no conftest: each
module declares a session fixture that calls it). `reference_greedy` is the independent
oracle: the executor's own prefill/decode with a host argmax, no engine involved.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 8
NUM_PAGES = 40  # page_size 16: 640 tokens of KV for up to 8 sequences of up to 256
SERVER_LIMITS = [
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--max-num-batched-tokens", "32",
    "--max-model-len", str(MAX_MODEL_LEN),
    "--num-pages", str(NUM_PAGES),
    "--max-waiting", "32",
]  # fmt: skip
JAX_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"]
STARTUP_TIMEOUT_S = 420  # a cold compile of every step program on a busy 2-core machine
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`model`: served with `--preset MODEL` unless `args` name a model (None: the server's default)."""

    def __init__(self, args: list[str], model: str | None = MODEL):
        if model is not None and not {"--model", "--preset"} & set(args):
            args = ["--preset", model, *args]
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="ferrum_serve_", suffix=".log")[1])
        env = {
            **os.environ,
            "JAX_COMPILATION_CACHE_DIR": JAX_CACHE_DIR,
            # Cache every program: the tiny model's compile fast enough to be skipped by default.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ferrum_jax.serve", "--port", str(self.port), *args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> "LiveServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s. The log is kept only if the server did not exit cleanly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ clients

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        # max_retries=0: the client would otherwise retry 5xx replies the tests check for.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def async_client(self, api_key: str = "unused", **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.base_url}{path}", timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=30, **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics parsed with prometheus_client's own parser: each sample by name (one
        model, so labels are dropped, except `finished_reason`, kept as `name{reason}`;
        histogram buckets are skipped, their _count and _sum kept)."""
        r = self.get("/metrics")
        r.raise_for_status()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                reason = sample.labels.get("finished_reason")
                out[f"{sample.name}{{{reason}}}" if reason else sample.name] = sample.value
        return out

    def wait_idle(self, timeout_s: float = 30) -> dict[str, float]:
        """Polls /metrics until nothing runs, nothing waits, and no KV page is in use."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = m["ferrum:num_requests_running"] == 0 and m["ferrum:num_requests_waiting"] == 0 and m["ferrum:kv_cache_usage_perc"] == 0
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


_SERVERS: dict[tuple[str, ...], LiveServer] = {}


def shared_server(args: list[str] = ()) -> LiveServer:
    """The session's server for `SERVER_LIMITS + args`, started on first use."""
    key = tuple(args)
    if key not in _SERVERS or _SERVERS[key].proc.poll() is not None:
        _SERVERS[key] = LiveServer([*SERVER_LIMITS, *args]).wait_ready()
    return _SERVERS[key]


def stop_all() -> None:
    for server in _SERVERS.values():
        server.stop()


atexit.register(stop_all)


# ---------------------------------------------------------------------------- reference


_REFERENCE = {}


def reference_executor():
    """The executor the server runs (same preset, same limits), in this process."""
    if "ex" not in _REFERENCE:
        import ferrum_jax as fj

        _REFERENCE["ex"] = fj.JaxModelExecutor.from_preset(
            MODEL, max_batch_size=MAX_NUM_SEQS, max_sequence_length=MAX_MODEL_LEN, max_num_batched_tokens=32
        )
    return _REFERENCE["ex"]


def reference_greedy(prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by the executor's prefill + decode and a host argmax."""
    import ferrum_jax as fj

    ex = reference_executor()

    async def run() -> list[int]:
        out = await ex.prefill(fj.PrefillInput(input_ids=np.array([prompt_ids], np.int32)))
        handle = out.kv_cache
        try:
            token = int(np.argmax(np.asarray(out.last_token_logits())[0]))
            tokens = [token]
            for _ in range(steps - 1):
                d = await ex.decode(fj.DecodeInput(input_ids=np.array([[token]], np.int32), kv_cache=handle))
                token = int(np.argmax(np.asarray(d.logits)[0]))
                tokens.append(token)
            return tokens
        finally:
            ex.release_cache(handle.cache_id)

    return asyncio.run(run())


def byte_tokenizer():
    from ferrum_jax.serve.byte_tokenizer import ByteTokenizer

    return ByteTokenizer()


def random_prompt(rng: np.random.Generator, n: int) -> list[int]:
    """n token ids of printable ASCII, so prompts are also valid text."""
    return [int(t) for t in rng.integers(0x20, 0x7F, size=n)]
