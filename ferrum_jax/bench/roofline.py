"""`python -m ferrum_jax.bench roofline`: the decode roofline table of BENCHMARKS.md (issue 26).

Compiles the decode program set of each (target, model, weights) row with `python -m
ferrum_jax.aot` (compile-only: libtpu, the jax CUDA plugin) in its own process, and prints one
row per run: weights a device holds, the excess of the worst program (bytes written and read
back beyond KV, logits and activations, over the weights' bytes) and the predicted step time
and tokens/s for a decode of 1 and of 16 sequences (aot.roofline, in the program that serves
them). A run that fails prints its error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = ("Llama-3-8B", str(REPO / "configs" / "models" / "llama-3-8b"), 1)
LLAMA_70B = ("Llama-3-70B TP 8", str(REPO / "configs" / "models" / "llama-3-70b"), 8)
ROWS = [
    ("tpu-v6e-1", LLAMA_8B, None), ("tpu-v6e-1", LLAMA_8B, "int8"), ("tpu-v6e-1", LLAMA_8B, "int4"),
    ("tpu-v5e-1", LLAMA_8B, "int8"), ("tpu-v5e-1", LLAMA_8B, "int4"),
    ("gpu-h100", LLAMA_8B, None), ("gpu-h100", LLAMA_8B, "int8"), ("gpu-h100", LLAMA_8B, "int4"),
    ("tpu-v5e-8", LLAMA_70B, "int8"), ("tpu-v6e-8", LLAMA_70B, None), ("tpu-v6e-8", LLAMA_70B, "int4"),
]  # fmt: skip
DECODE_SET = ["--max-model-len", "2048", "--max-num-seqs", "16", "--max-num-batched-tokens", "16", "--programs", "logits_last"]


def run(target: str, model: tuple[str, str, int], quantization: str | None) -> dict:
    """The aot --json report of one row (or {"error": ...})."""
    _, path, tp = model
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = [sys.executable, "-m", "ferrum_jax.aot", "--target", target, "--model", path, *DECODE_SET,
                "--tensor-parallel-size", str(tp), "--json", str(out)]
        if quantization:
            args += ["--quantization", quantization]
        proc = subprocess.run(args, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
        if not out.exists():
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        return json.loads(out.read_text())


def row(target: str, model: tuple[str, str, int], quantization: str | None, r: dict) -> str:
    head = f"| {target}, {model[0]} | {quantization or 'bf16'} |"
    if "roofline" not in r:
        return f"{head} {r.get('error') or ('does not fit' if r.get('fits') is False else 'failed')} | | | |"
    worst = max(r["roofline"], key=lambda x: x["excess_of_weights"])

    def decode(n: int) -> str:
        d = r["decode"].get(f"decode_{n}")
        return f"{100 * d['excess_of_weights']:.1f}%, {d['predicted_ms']:.2f}, {d['predicted_tokens_per_s']:g}" if d else "-"

    return (f"{head} {r['weight_bytes_per_device'] / 2**30:.2f} | {decode(1)} | {decode(16)} | "
            f"{100 * worst['excess_of_weights']:.1f}% ({worst['program']}) |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench roofline", description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="+", help="only the rows of these targets")
    args = p.parse_args(argv)
    print("| target, model | weights | GiB/device | decode b=1: excess, ms, tok/s | decode b=16: excess, ms, tok/s | "
          "worst excess (program) |\n|---|---|---:|---|---|---|", flush=True)
    for target, model, quantization in ROWS:
        if args.targets and target not in args.targets:
            continue
        print(row(target, model, quantization, run(target, model, quantization)), flush=True)


if __name__ == "__main__":
    main()
