"""The on-device sampler alone: `python -m ferrum_jax.bench sampler`.

`step.sampling.sample` jitted over 32 rows of float32 logits the default model's vocabulary wide
(49152), three batches: greedy, temperature 0.8 with top-p 0.9 (seeded), and a repetition
penalty over 300 history tokens. Reported: the median wall time of `--repeats` runs after a warm one.
"""

from __future__ import annotations

import argparse
import statistics
import time

ROWS, VOCAB, HISTORY = 32, 49152, 2048


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench sampler", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=60)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ferrum_jax.step.sampling import SamplingRow, build_sampling_batch, sample

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(ROWS, VOCAB)), jnp.float32)
    fn = jax.jit(sample)
    batches = {
        "greedy": [SamplingRow() for _ in range(ROWS)],
        "temperature 0.8, top-p 0.9": [SamplingRow(temperature=0.8, top_p=0.9, seed=i) for i in range(ROWS)],
        "repetition penalty, 300 tokens": [
            SamplingRow(repetition_penalty=1.1, history=np.arange(300, dtype=np.int32), num_prompt=100) for _ in range(ROWS)
        ],
    }
    for name, rows in batches.items():
        batch = jax.tree.map(jnp.asarray, build_sampling_batch(rows, ROWS, HISTORY, VOCAB))
        jax.block_until_ready(fn(logits, batch))
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(logits, batch))
            runs.append(time.perf_counter() - t0)
        print(f"{name}: {statistics.median(runs) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
