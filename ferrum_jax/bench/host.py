"""Host time per engine step: `python -m ferrum_jax.bench host`.

The tiny preset's step programs take little device time, so what an engine step costs beyond
them is the host's: scheduling, the batch and sampling arrays, reading results back, appending
tokens. `--concurrency` requests with `--prompt-len`-token prompts decode `--output-len` tokens
each through the engine (greedy, ignore_eos), after one untimed round that compiles everything.

Per decode step (every sequence of the step decoding; the median batch is reported with them;
early requests finish while the last prompts are still being prefilled) it reports the median of:
  step      the engine's `_run_step`, all of it;
  device    the compiled programs the step ran, each timed to `block_until_ready` (the sync
            this inserts is the one the step makes anyway when it reads the sampled ids);
  host      step - device.
Run it at two prompt lengths to see whether host time grows with the context.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench host", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 1536])
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    import ferrum_jax as fj
    from ferrum_jax.engine import Engine, EngineConfig, SamplingParams

    max_len = max(args.prompt_len) + args.output_len + 16
    ex = fj.JaxModelExecutor.from_preset(
        "tiny", dtype="float32", max_batch_size=args.concurrency, max_sequence_length=max_len,
        max_num_batched_tokens=max(512, args.concurrency), page_size=16,
    )
    device = []
    run_program = ex._run_program

    def timed_program(*a):
        t0 = time.perf_counter()
        out = jax.block_until_ready(run_program(*a))
        device.append(time.perf_counter() - t0)
        return out

    ex._run_program = timed_program
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    async def run(prompt_len: int) -> list[tuple[float, float]]:
        engine = Engine(ex, EngineConfig())
        steps = []
        run_step = engine._run_step

        async def timed_step(work):
            decoding = all(r.num_uncomputed == 1 for r, _ in work)
            device.clear()
            t0 = time.perf_counter()
            await run_step(work)
            if decoding:
                steps.append((time.perf_counter() - t0, sum(device), len(work)))

        engine._run_step = timed_step
        await engine.start()
        rng = np.random.default_rng(prompt_len)

        async def one(i):
            async for _ in engine.add_request(f"r{i}", rng.integers(0, 256, prompt_len).tolist(), params):
                pass

        try:
            await asyncio.gather(*[one(i) for i in range(args.concurrency)])
        finally:
            await engine.stop()
        return steps

    print(f"tiny preset, {args.concurrency} requests, {args.output_len} output tokens each; medians per decode-only step")
    print("| prompt tokens | sequences | step ms | device ms | host ms | steps |")
    print("|---:|---:|---:|---:|---:|---:|")
    for prompt_len in args.prompt_len:
        asyncio.run(run(prompt_len))  # compiles every shape this run meets
        steps = asyncio.run(run(prompt_len))
        wall = statistics.median(s for s, _, _ in steps)
        dev = statistics.median(d for _, d, _ in steps)
        host = statistics.median(s - d for s, d, _ in steps)
        seqs = statistics.median(n for _, _, n in steps)
        print(f"| {prompt_len} | {seqs:g} | {wall * 1e3:.2f} | {dev * 1e3:.2f} | {host * 1e3:.2f} | {len(steps)} |")


if __name__ == "__main__":
    main()
