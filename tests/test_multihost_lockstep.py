"""Serving across two processes in lockstep, on CPU: the same `python -m ferrum_jax.serve`
command on both (one CPU device each, gloo collectives), the model sharded over both
(`--tensor-parallel-size 2`), so every step is a program that only runs when both
processes launch it. Process 0 serves HTTP; process 1 only replays its executor calls.
Concurrent greedy completions equal a single-process executor's own greedy decode, and a
SIGTERM to the leader drains it, stops the follower, and both exit 0. With a draft model
(the target's own weights, so every greedy draft is accepted) the draft executor's calls
go through the same command stream.

The pair compiles its TP=2 programs on first use: `--no-warmup` keeps the test short (a
warmup of every step program takes minutes on two busy CPU cores; it is one more lockstep
command, `warmup`, replayed like the others). The command stream itself -- ordering,
refused calls, idle waits, deleting what was read -- is also checked in one process with
recording stand-ins for the executors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from serve_fixtures import JAX_CACHE_DIR, MAX_MODEL_LEN, MAX_NUM_SEQS, NUM_PAGES, REPO, LiveServer, free_port, random_prompt

LIMITS = [
    "--preset", "tiny",
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--max-num-batched-tokens", "64",
    "--max-model-len", str(MAX_MODEL_LEN),
    "--num-pages", str(NUM_PAGES),
]  # fmt: skip
MAX_TOKENS = 12
EXIT_TIMEOUT_S = 60
SELF_DRAFT = ["--speculative-method", "draft", "--speculative-model", "preset:tiny:0", "--num-speculative-tokens", "3"]


def _env() -> dict[str, str]:
    # One CPU device per process (the suite's conftest fakes 8 for in-process tests).
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COMPILATION_CACHE_DIR": JAX_CACHE_DIR,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _job(extra: list[str]) -> list[str]:
    return [*LIMITS, "--tensor-parallel-size", "2", "--num-processes", "2", *extra]


def _greedy_reference(prompts: list[list[int]]) -> list[list[int]]:
    """Greedy decode of each prompt by a one-process executor (one device, no engine)."""
    import ferrum_jax as fj

    ex = fj.JaxModelExecutor.from_preset(
        "tiny", max_batch_size=MAX_NUM_SEQS, max_sequence_length=MAX_MODEL_LEN, max_num_batched_tokens=64, num_pages=NUM_PAGES
    )

    async def one(prompt: list[int]) -> list[int]:
        out = await ex.prefill(fj.PrefillInput(input_ids=np.array([prompt], np.int32)))
        handle, tokens = out.kv_cache, [int(np.argmax(np.asarray(out.last_token_logits())[0]))]
        try:
            while len(tokens) < MAX_TOKENS:
                d = await ex.decode(fj.DecodeInput(input_ids=np.array([[tokens[-1]]], np.int32), kv_cache=handle))
                tokens.append(int(np.argmax(np.asarray(d.logits)[0])))
            return tokens
        finally:
            ex.release_cache(handle.cache_id)

    return [asyncio.run(one(p)) for p in prompts]


@pytest.mark.parametrize("extra", [[], SELF_DRAFT], ids=["plain", "draft"])
def test_two_processes_serve_in_lockstep_and_stop_together(extra, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    args = _job([*extra, "--no-warmup", "--coordinator-address", address])
    log = tempfile.NamedTemporaryFile(prefix="ferrum_follower_", suffix=".log", delete=False)
    follower = subprocess.Popen(
        [sys.executable, "-m", "ferrum_jax.serve", *args, "--process-id", "1"],
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    for name, value in _env().items():  # LiveServer starts the leader with this process's environment
        monkeypatch.setenv(name, value)
    leader = None
    try:
        leader = LiveServer([*args, "--process-id", "0"])
        rng = np.random.default_rng(11)
        prompts = [random_prompt(rng, n) for n in (5, 17, 40)]
        expected = _greedy_reference(prompts)
        leader.wait_ready()

        async def complete_all():
            client = leader.async_client()
            replies = await asyncio.gather(
                *(
                    client.completions.create(
                        model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                        extra_body={"ignore_eos": True, "return_token_ids": True},
                    )
                    for p in prompts
                )
            )  # fmt: skip
            return [r.choices[0].token_ids for r in replies]

        assert asyncio.run(complete_all()) == expected
        # A constrained request: its masked sampler runs on both processes too.
        pattern = "[a-c]{4}-[0-9]{2}"
        r = leader.client().completions.create(
            model="tiny", prompt="code:", max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
            extra_body={"structured_outputs": {"regex": pattern}},
        )  # fmt: skip
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        if extra:
            assert leader.metrics()["ferrum:spec_decode_num_accepted_tokens_total"] > 0

        leader.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert leader.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, leader.log_tail()
        assert follower.wait(timeout=EXIT_TIMEOUT_S) == 0, open(log.name).read()[-4000:]
        assert time.monotonic() - t0 < EXIT_TIMEOUT_S
        replayed = re.search(r"the leader stopped after (\d+) commands", open(log.name).read())
        assert replayed and int(replayed[1]) > 0, open(log.name).read()[-4000:]
    finally:
        for p in (follower, leader and leader.proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        log.close()
    os.unlink(log.name)  # kept only when the test failed


_IN_PROCESS = r"""
import sys, threading, time
import jax
jax.distributed.initialize(sys.argv[1], num_processes=1, process_id=0)
from ferrum_jax.engine import lockstep
from ferrum_jax.interfaces.errors import FerrumError

class Recorder:
    # Stands in for an executor: records the calls it gets, refuses truncate to 0.
    max_sequence_length = 256
    def __init__(self):
        self.calls = []
    def new_kv_cache(self, cache_id):
        self.calls.append(("new_kv_cache", cache_id))
        return cache_id
    def truncate(self, handle, n):
        self.calls.append(("truncate", handle, n))
        if n == 0:
            raise FerrumError.invalid_request("refused")
    def sample_unified(self, items, rows, allowed=None):
        self.calls.append(("sample_unified", items, rows, None if allowed is None else allowed.tolist()))
        return [len(items)]
    async def warmup(self):
        self.calls.append(("warmup",))

lockstep._POLL_MS = 50  # the follower times out and waits on while the leader is idle
leader, follower, leader_draft, follower_draft = Recorder(), Recorder(), Recorder(), Recorder()
done = {}
t = threading.Thread(target=lambda: done.update(n=lockstep.follow(follower, follower_draft)))
t.start()
time.sleep(0.5)
channel = lockstep.Channel()
ex = lockstep.LockstepExecutor(leader, channel)
dex = lockstep.LockstepExecutor(leader_draft, channel, "draft")
import asyncio
asyncio.run(ex.warmup())
assert ex.new_kv_cache("a") == "a" and ex.max_sequence_length == 256
assert dex.new_kv_cache("d") == "d"
try:
    ex.truncate("a", 0)
except FerrumError:
    pass
assert ex.sample_unified(["a"], [None]) == [1]
# A constrained step: the forward waits for its bitmask, then all of it runs everywhere.
import numpy as np
assert ex.collect(ex.launch_sampler(ex.launch_forward(["a", "b"]), [None, None], np.array([[5], [-1]], np.int32))) == [2]
channel.stop()
t.join(10)
assert done["n"] == 6, done
assert leader.calls[-1] == ("sample_unified", ["a", "b"], [None, None], [[5], [-1]]), leader.calls
assert follower.calls == leader.calls, (follower.calls, leader.calls)
assert follower_draft.calls == leader_draft.calls == [("new_kv_cache", "d")], follower_draft.calls
from jax._src import distributed
client = distributed.global_state.client
assert client.key_value_dir_get_bytes("ferrum_jax/lockstep/") == [("ferrum_jax/lockstep/7", client.key_value_try_get_bytes("ferrum_jax/lockstep/7"))]
print("ok")
"""


def test_follower_replays_the_leaders_calls_in_order():
    """One process as both leader and follower (the store does not care): the follower waits
    through idle timeouts, replays every command (a refused one included) on the executor
    it names, returns at `stop`; the keys of commands every follower read are deleted."""
    out = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, f"127.0.0.1:{free_port()}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-4000:]
