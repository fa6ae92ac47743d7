"""Where a serving run's time goes, step by step: `python -m ferrum_jax.bench timeline`.

The default model in float32 behind the engine with the server's limits (32 sequences,
max_model_len 2048, `--max-num-batched-tokens`), in process: `--requests` requests of
`--prompt-len` random token ids and `--output-len` greedy tokens (ignore_eos), at most
`--concurrency` in flight, after one untimed round that compiles every shape the run meets.
Every engine step is recorded at its launch: its tokens, its sequences and how many of them
decode. A step's time is the interval to the next launch (with async scheduling that is what the
step costs the run, host work included). Reported per kind of step (decode only, decodes beside
prefill chunks, prefill only): count, total and median seconds, tokens per step; then the whole
run's output tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench timeline", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = p.parse_args(argv)

    import numpy as np

    from ferrum_jax.default_model import default_model_path
    from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
    from ferrum_jax.executor.jax_executor import JaxModelExecutor

    ex = JaxModelExecutor.from_pretrained(
        default_model_path(), dtype="float32", progress=False, max_batch_size=32, max_sequence_length=2048,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    async def run(seed: int) -> tuple[list[tuple[float, int, int, int]], float]:
        engine = Engine(ex, EngineConfig())
        launches: list[tuple[float, int, int, int]] = []
        run_step = engine._run_step

        async def recorded(work):
            decodes = sum(1 for r, n in work if r.num_uncomputed == 1)
            launches.append((time.perf_counter(), sum(n for _, n in work), len(work), decodes))
            await run_step(work)

        engine._run_step = recorded
        await engine.start()
        rng = np.random.default_rng(seed)
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i):
            async with gate:
                async for _ in engine.add_request(f"r{i}", rng.integers(100, 40000, args.prompt_len).tolist(), params):
                    pass

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*[one(i) for i in range(args.requests)])
        finally:
            end = time.perf_counter()
            await engine.stop()
        launches.append((end, 0, 0, 0))
        return launches, end - t0

    asyncio.run(run(0))  # compiles
    launches, wall = asyncio.run(run(1))
    kinds: dict[str, list[tuple[float, int]]] = {"decode only": [], "decodes + prefill": [], "prefill only": []}
    for (t, tokens, seqs, decodes), (t_next, *_) in zip(launches, launches[1:]):
        kind = "decode only" if decodes == seqs else "prefill only" if decodes == 0 else "decodes + prefill"
        kinds[kind].append((t_next - t, tokens))
    print(f"default model, float32; {args.requests} requests of {args.prompt_len} + {args.output_len} tokens, "
          f"{args.concurrency} at once, max_num_batched_tokens {args.max_num_batched_tokens}")
    print("| steps | count | total s | median ms | median tokens |")
    print("|---|---:|---:|---:|---:|")
    for kind, steps in kinds.items():
        if steps:
            print(f"| {kind} | {len(steps)} | {sum(s for s, _ in steps):.2f} | "
                  f"{statistics.median(s for s, _ in steps) * 1e3:.1f} | {statistics.median(n for _, n in steps):g} |")
    print(f"\nwall {wall:.2f} s, output {args.requests * args.output_len / wall:.1f} tok/s")


if __name__ == "__main__":
    main()
