"""Weight quantization on the default model: `python -m ferrum_jax.bench quant`.

SmolLM2-135M-Instruct loaded three ways (float32, `quantization="int8"`, `"int4"`), each decoding
greedily in one process: per-step time of `decode` (batch 1) and of one `batch_decode` over
`--batch` sequences (32-token prompts), median over `--steps` steps after a warmup round; the
parameter bytes each step reads (every weight once per step; per token, divided by the
batch), and the parameter memory. Runs alternate between the three executors `--repeats`
times, so load drift on a shared machine falls on all three alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench quant", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import numpy as np

    import ferrum_jax as fj
    from ferrum_jax.bench.executor import FerrumSide

    methods = {"float32": None, "int8": "int8", "int4": "int4"}
    executors = {
        name: fj.JaxModelExecutor.from_pretrained(
            fj.default_model_path(), dtype="float32", quantization=q, max_batch_size=args.batch,
            max_sequence_length=256, max_num_batched_tokens=256, progress=False,
        )
        for name, q in methods.items()
    }  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, 32).astype(np.int32) for _ in range(args.batch)]
    times = {(name, b): [] for name in methods for b in (1, args.batch)}

    async def run(repeat: int) -> None:
        for name, ex in executors.items():
            side = FerrumSide(ex, fj)
            for b in (1, args.batch):
                steps, _ = await side.decode_steps(prompts[:b], args.steps)
                if repeat >= 0:
                    times[(name, b)] += steps

    asyncio.run(run(-1))  # compiles every program
    for r in range(args.repeats):
        asyncio.run(run(r))

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f}; SmolLM2-135M-Instruct, float32 activations")
    print(f"| weights | parameter MB | batch 1 tok/s | batch {args.batch} tok/s | weight MB read per token, b=1 / b={args.batch} |")
    print("|---|---:|---:|---:|---:|")
    base = {}
    for name, ex in executors.items():
        mb = ex.memory_requirements().parameter_memory / 1e6
        tps = {b: b / statistics.median(times[(name, b)]) for b in (1, args.batch)}
        base.setdefault("tps", tps)
        print(f"| {name} | {mb:.0f} | {tps[1]:.1f} | {tps[args.batch]:.1f} | {mb:.0f} / {mb / args.batch:.0f} |")
    for name in list(methods)[1:]:
        tps = {b: b / statistics.median(times[(name, b)]) for b in (1, args.batch)}
        print(f"{name} / float32: batch 1 {tps[1] / base['tps'][1]:.2f}x, batch {args.batch} {tps[args.batch] / base['tps'][args.batch]:.2f}x")
