"""`python -m ferrum_jax.bench serve-vs-hf`: the ferrum_jax server under the serving
benchmark vs HF transformers generating the same prompts in static batches, same
weights, same machine, one run.

    python -m ferrum_jax.bench serve-vs-hf            # tiny and ~125M, concurrency 1, 8, 32
    python -m ferrum_jax.bench serve-vs-hf --quick    # tiny only, few prompts (smoke run)

For each model a seeded random-init Llama is built with transformers
(`torch.manual_seed`) and written with `save_pretrained`; the server loads that
directory, so both sides run the same weights:

  tiny   the fields of configs/tiny.yaml (the test preset's architecture; its
         weights here are torch's init, not the preset's JAX init)
  125m   `bench.FULL`, the core benchmark's model (768 hidden, 12 layers, 12q/4kv heads,
         2048 intermediate, 32000 vocab)

ferrum side: `python -m ferrum_jax.serve --model DIR --tokenizer byte --dtype float32`
as a subprocess on a free loopback port, with room for the largest concurrency
(`--max-num-seqs` = it, a KV pool that holds that many prompt+output sequences, so
nothing is preempted; the preemption counter is checked) and its own XLA compilation
cache in a temp dir. It is started twice, each timed from spawn to a healthy /health:
cold (weights + compiling every step program into the empty cache), then warm (the
programs loaded from that cache); the warm one is measured. Per concurrency, the serving
benchmark (`bench_serve.run`, in process) with `ignore_eos` and greedy requests: all
prompts arrive at once, at most `concurrency` in flight. The server is stopped before
the HF side runs, so the two never share the CPU.

HF side: the same prompt token ids (the benchmark's workload, rebuilt from the same seed
through the server's /tokenize), in static batches of `concurrency` prompts, each batch
one `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with eos disabled,
left-padded, under `torch.inference_mode`, `torch.set_num_threads(os.cpu_count())`,
default (sdpa) attention, after one warmup batch.

Output tok/s on both sides = generated tokens / wall time of the whole run (ferrum:
first request sent to last byte received; HF: sum of the batches' generate times), so
both include prefill. ferrum's figure also pays HTTP, SSE and the benchmark client,
which runs in this process on the same cores. A greedy cross-check compares the
server's tokens for the first prompt with HF's (random weights give near-uniform
logits, so a late divergence can be float rounding; an early one means wrong weights).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from ferrum_jax.bench import executor as bench
from ferrum_jax.bench import serve as bench_serve

REPO = Path(__file__).resolve().parents[2]
PAGE_SIZE = 16
MODELS = ("tiny", "125m")


def build_model(name: str):
    torch, transformers = bench._import_hf()
    if name == "125m":
        return bench.build_hf_model(bench.FULL, max_seq=2048)
    from ferrum_jax.executor.presets import load_preset

    fields = {k: v for k, v in load_preset("tiny").hf_config.items() if k != "model_type"}
    torch.manual_seed(bench.SEED)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(torch.float32).eval()


# ----------------------------------------------------------------------------- server


class Server:
    """`python -m ferrum_jax.serve` on a free loopback port; output goes to a log file."""

    def __init__(self, model_dir: str, cache_dir: str, max_seqs: int, max_model_len: int, batched_tokens: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # One page of slack per sequence: the engine may allocate a sequence's next page
        # before its last token, and a preemption would make this a different benchmark.
        self.num_pages = max_seqs * (math.ceil(max_model_len / PAGE_SIZE) + 1) + 1
        args = [
            "--model", model_dir, "--tokenizer", "byte", "--dtype", "float32",
            "--port", str(self.port), "--page-size", str(PAGE_SIZE),
            "--max-num-seqs", str(max_seqs), "--max-num-batched-tokens", str(batched_tokens),
            "--max-model-len", str(max_model_len), "--num-pages", str(self.num_pages),
            "--max-waiting", str(4 * max_seqs), "--disable-uvicorn-access-log",
        ]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile(prefix="ferrum_serve_vs_hf_", suffix=".log", delete=False)
        # The run's own compilation cache (a user-set JAX one would win over it): the first
        # start is then always a cold compile, and the user's cache is left untouched.
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["FERRUM_JAX_CACHE_DIR"] = cache_dir
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferrum_jax.serve", *args], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def log_tail(self, n: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from spawn to a 200 from /health."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def counter(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        m = re.search(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if m is None:
            raise RuntimeError(f"{name} missing from /metrics")
        return float(m.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        if self.proc.returncode == 0:
            os.unlink(self.log.name)
        else:
            print(f"server exited with {self.proc.returncode}; its log: {self.log.name}")


def serve_args(base_url: str, concurrency: int, num_prompts: int, args) -> argparse.Namespace:
    return bench_serve.parse_args(
        [
            "--base-url", base_url, "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--seed", str(bench.SEED),
        ]
    )  # fmt: skip


async def workload(sargs) -> list[list[int]]:
    """The benchmark's prompt token ids: the function, seed and server `bench_serve.run` uses."""
    async with httpx.AsyncClient(base_url=sargs.base_url, timeout=httpx.Timeout(None, connect=30)) as http:
        _, pairs = await bench_serve._workload(http, sargs)
    return [prompt for prompt, _ in pairs]


def server_greedy(base_url: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=None)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


# ----------------------------------------------------------------------------- HF


def hf_generate(torch, transformers, model, prompts: list[list[int]], new_tokens: int) -> tuple[np.ndarray, float]:
    """One static batch: greedy, exactly `new_tokens` each; (tokens, seconds)."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    gen = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=gen)
    seconds = time.perf_counter() - t
    assert out.shape[1] == width + new_tokens, out.shape
    return out[:, width:].numpy(), seconds


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench serve-vs-hf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only, num-prompts = concurrency (smoke run)")
    p.add_argument("--models", default=None, help=f"comma-separated, of {','.join(MODELS)} (default: all; --quick: tiny)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated max concurrencies (= HF batch sizes)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="server token budget per engine step")
    p.add_argument("--startup-timeout", type=float, default=1800, help="seconds to wait for the server's /health")
    args = p.parse_args(argv)
    args.models = (args.models or ("tiny" if args.quick else ",".join(MODELS))).split(",")
    if unknown := set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(unknown)}; known: {list(MODELS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.output_len < 2 or min(args.concurrency) < 1:
        p.error("--output-len must be >= 2 and every concurrency >= 1")
    return args


def num_prompts(args, concurrency: int) -> int:
    # Two full waves at the largest concurrency, and enough requests for medians at the smallest.
    return concurrency if args.quick else max(32, 2 * concurrency)


def bench_model(name: str, args, torch, transformers) -> list[dict]:
    model = build_model(name)
    print(f"\n## {name}: {bench.n_params(model) / 1e6:.1f}M params, float32", flush=True)
    rows = [dict(model=name, concurrency=c) for c in args.concurrency]
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as cache_dir:
        model.save_pretrained(model_dir, safe_serialization=True)
        limits = (max(args.concurrency), args.input_len + args.output_len, args.max_num_batched_tokens)
        # Started twice: cold (compiles every step program into the empty cache), then
        # warm (loads them); the warm one is benchmarked.
        cold = Server(model_dir, cache_dir, *limits)
        try:
            startup = [cold.wait_ready(args.startup_timeout)]
        finally:
            cold.stop()
        server = Server(model_dir, cache_dir, *limits)
        try:
            startup.append(server.wait_ready(args.startup_timeout))
            print(f"server startup: cold {startup[0]:.1f}s, warm cache {startup[1]:.1f}s; {server.num_pages} KV pages", flush=True)
            for row in rows:
                sargs = serve_args(server.base_url, row["concurrency"], num_prompts(args, row["concurrency"]), args)
                row["prompts"] = asyncio.run(workload(sargs))
                m = asyncio.run(bench_serve.run(sargs))
                if m["failed"]:
                    raise RuntimeError(f"{m['failed']} requests failed: {m['errors']}")
                row.update(ferrum=m["output_throughput"], ttft=m["median_ttft_ms"], tpot=m["median_tpot_ms"], n=m["completed"])
                row["load_ferrum"] = os.getloadavg()[0]
                print(f"ferrum c={row['concurrency']}: {m['output_throughput']:.1f} output tok/s over {m['duration_s']:.1f}s", flush=True)
            ferrum_greedy = server_greedy(server.base_url, rows[0]["prompts"][0], args.output_len)
            preemptions = server.counter("ferrum:num_preemptions")
            print(f"preemptions: {preemptions:.0f}" + (" (WARNING: the KV pool was too small for the load)" if preemptions else ""))
        finally:
            server.stop()
    for row in rows:
        prompts = row.pop("prompts")
        c = row["concurrency"]
        hf_generate(torch, transformers, model, prompts[:c], args.output_len)  # warmup
        tokens, seconds = 0, 0.0
        for i in range(0, len(prompts), c):
            out, s = hf_generate(torch, transformers, model, prompts[i : i + c], args.output_len)
            tokens, seconds = tokens + out.size, seconds + s
            if row is rows[0] and i == 0:
                hf_greedy = out[0].tolist()
        row["hf"] = tokens / seconds
        row["load_hf"] = os.getloadavg()[0]
        print(f"HF c={c}: {row['hf']:.1f} output tok/s over {seconds:.1f}s", flush=True)
    agree = next((i for i, (a, b) in enumerate(zip(ferrum_greedy, hf_greedy)) if a != b), len(hf_greedy))
    print(f"greedy cross-check, first prompt: ferrum and HF agree on the first {agree}/{len(hf_greedy)} tokens")
    for row in rows:
        row.update(startup=startup, agree=f"{agree}/{len(hf_greedy)}")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    # SIGTERM as an exception, so the `finally` that stops the server runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # The machine may be shared; other load skews both sides (torch's OpenMP barriers
    # stall badly when a core is taken), so the load average goes with the results.
    load_at_start = os.getloadavg()
    torch, transformers = bench._import_hf()
    torch.set_num_threads(os.cpu_count())
    t0 = time.perf_counter()
    rows = [row for name in args.models for row in bench_model(name, args, torch, transformers)]
    load_at_end = os.getloadavg()

    print()
    for k, v in bench.machine_info(torch, transformers, load_at_start):
        print(f"- {k}: {v}")
    print(f"- load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_at_end)}")
    print(f"- workload: input {args.input_len}, output {args.output_len} tokens (ignore_eos, greedy), server --max-num-batched-tokens {args.max_num_batched_tokens}")
    print(f"- total run time: {time.perf_counter() - t0:.0f}s")
    if max(load_at_start[0], load_at_end[0]) > 1.5 * (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work; these figures are not comparable")
    print()
    # The 1-min load average right after each measurement: shows which rows shared the CPU.
    print("| model | concurrency | prompts | ferrum output tok/s | HF output tok/s | ferrum/HF | ferrum median TTFT (ms) | ferrum median TPOT (ms) | load after ferrum / HF |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['concurrency']} | {r['n']} | {r['ferrum']:.1f} | {r['hf']:.1f} | {r['ferrum'] / r['hf']:.2f}x"
            f" | {r['ttft']:.1f} | {r['tpot']:.1f} | {r['load_ferrum']:.2f} / {r['load_hf']:.2f} |"
        )
    print()
    for name in args.models:
        r = next(r for r in rows if r["model"] == name)
        print(f"- {name}: server startup cold {r['startup'][0]:.1f}s, warm cache {r['startup'][1]:.1f}s; greedy cross-check {r['agree']} tokens")
