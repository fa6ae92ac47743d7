"""Host time per engine step, with and without async scheduling: `python -m ferrum_jax.bench host`.

The tiny preset's step programs take little device time, so what an engine step costs beyond
them is the host's: scheduling, the batch and sampling arrays, reading results back, appending
tokens. `--concurrency` requests with `--prompt-len`-token prompts decode `--output-len` tokens
each through the engine (greedy, ignore_eos), after one untimed round that compiles everything.
Three runs per prompt length, medians over decode-only steps (every sequence of the step
decoding; the median batch is reported with them):
  device      synchronous engine, each compiled program timed to `block_until_ready` (the sync
              this inserts is the one a synchronous step makes anyway when it reads its ids);
  sync step   the interval between consecutive decode-step launches, async scheduling off: the
              device time plus all of the host's;
  async step  the same interval with async scheduling on: the host prepares step N+1 and reads
              step N's tokens while the device runs;
  exposed     step - device: the host time the device waits for.
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

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    async def run(prompt_len: int, async_scheduling: bool, time_device: bool) -> list[tuple[float, float, int]]:
        """Per decode-only step: (interval since the previous decode step's launch, device, seqs)."""
        ex._run_program = timed_program if time_device else run_program
        engine = Engine(ex, EngineConfig(async_scheduling=async_scheduling))
        steps, last = [], [None]
        run_step = engine._run_step

        async def timed_step(work):
            decoding = all(r.num_uncomputed == 1 for r, _ in work)
            t0 = time.perf_counter()
            if decoding and last[0] is not None:  # the previous step: its interval and programs
                steps.append((t0 - last[0], sum(device), len(work)))
            device.clear()
            last[0] = t0 if decoding else None
            await run_step(work)

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
    print("| prompt tokens | sequences | device ms | sync step ms | async step ms | exposed host ms, sync | async | steps |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for prompt_len in args.prompt_len:
        asyncio.run(run(prompt_len, True, False))  # compiles every shape this run meets
        timed = asyncio.run(run(prompt_len, False, True))
        sync = asyncio.run(run(prompt_len, False, False))
        asynchronous = asyncio.run(run(prompt_len, True, False))
        dev = statistics.median(d for _, d, _ in timed)
        seqs = statistics.median(n for _, _, n in timed)
        s = statistics.median(i for i, _, _ in sync)
        a = statistics.median(i for i, _, _ in asynchronous)
        print(f"| {prompt_len} | {seqs:g} | {dev * 1e3:.2f} | {s * 1e3:.2f} | {a * 1e3:.2f} | "
              f"{(s - dev) * 1e3:.2f} | {(a - dev) * 1e3:.2f} | {len(asynchronous)} |")


if __name__ == "__main__":
    main()
