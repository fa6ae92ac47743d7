"""N-gram speculative decoding vs plain decoding, same engine, same run:
`python -m ferrum_jax.bench spec`.

Workload: prompts that quote their own earlier text (a random passage, then the passage
again, then its first half), greedy, `--max-tokens` new tokens each, `--concurrency`
requests at once. Reports generated tokens/s with and without speculation, the mean
acceptance length (tokens emitted per verify), and the cost of one verify forward over
k+1 positions relative to one decode step (batch 1, median over repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench spec", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the tiny preset instead of the ~125M config")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import jax

    import ferrum_jax as fj
    from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
    from ferrum_jax.engine.drafter import NgramDrafter
    from ferrum_jax.models.config import ModelConfig

    limits = dict(dtype="float32", max_batch_size=8, max_sequence_length=512, page_size=16, max_num_batched_tokens=256)
    if args.quick:
        ex = fj.JaxModelExecutor.from_preset("tiny", **limits)
    else:
        cfg = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                          num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64)
        ex = fj.JaxModelExecutor.from_config(cfg, seed=0, **limits)
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(args.concurrency):
        passage = rng.integers(0, 256, 40).tolist()
        prompts.append(passage + passage + passage[:20])
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    async def run(engine):
        await engine.start()

        async def one(i, prompt):
            ids = []
            async for out in engine.add_request(f"r{i}", prompt, params):
                ids += out.new_token_ids
            return ids

        try:
            t0 = time.perf_counter()
            outs = await asyncio.gather(*[one(i, pr) for i, pr in enumerate(prompts)])
            return outs, time.perf_counter() - t0, engine.stats()
        finally:
            await engine.stop()

    k = args.num_speculative_tokens
    asyncio.run(run(Engine(ex, EngineConfig())))  # compile the plain programs
    asyncio.run(run(Engine(ex, EngineConfig(num_speculative_tokens=k), NgramDrafter())))  # and the verify ones
    plain, t_plain, _ = asyncio.run(run(Engine(ex, EngineConfig())))
    spec, t_spec, stats = asyncio.run(run(Engine(ex, EngineConfig(num_speculative_tokens=k), NgramDrafter())))
    assert spec == plain, "speculative greedy output differs from plain greedy"
    generated = sum(len(o) for o in plain)

    async def step_costs():
        out = await ex.prefill(fj.PrefillInput(input_ids=np.array([prompts[0]], np.int32)))
        h = out.kv_cache
        base = h.num_tokens

        def timed(fn):
            fn()
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        def decode():
            ex.extend([(h, [7])], "last")
            ex.truncate(h, base)

        def verify():
            ex.extend([(h, [7] * (k + 1))], "all")
            ex.truncate(h, base)

        costs = timed(decode), timed(verify)
        ex.release_cache(h.cache_id)
        return costs

    t_decode, t_verify = asyncio.run(step_costs())
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}); "
          f"model: {'tiny preset' if args.quick else '~125M Llama (768 hidden, 12 layers, 12q/4kv), float32'}")
    print(f"workload: {args.concurrency} concurrent greedy requests of {len(prompts[0])} prompt tokens "
          f"(self-quoting), {args.max_tokens} new tokens each; n-gram k={k}")
    print("| | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| plain decoding | {generated / t_plain:.1f} | 1.00x |")
    print(f"| n-gram speculation | {generated / t_spec:.1f} | {t_plain / t_spec:.2f}x |")
    print(f"mean acceptance length: {stats.mean_acceptance_length:.2f} tokens per verify "
          f"({stats.spec_accepted_tokens} of {stats.spec_draft_tokens} drafts accepted over {stats.spec_verify_steps} verifies)")
    print(f"verify forward over {k + 1} positions: {t_verify / t_decode:.2f}x a decode step (batch 1)")


if __name__ == "__main__":
    main()
