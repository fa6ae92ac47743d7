"""Decode attention alone on XLA:CPU: `python -m ferrum_jax.bench cpu-attention`.

One layer of the default model's attention shapes (9 query heads over 3 KV heads, head_dim 64,
page 16, capacity 2048 positions per sequence) for a decode step of `--seqs` sequences at each
`--contexts` length, pages shuffled over the pool as a served batch leaves them: the blocked XLA
path (gathering each kv block's pages) against the same path handing its one-token blocks to the
C++ custom call (`cpu_kernel.cc`, reading the pages in place). Reported: median ms per layer of
`--repeats` calls, and the K/V bytes a layer must read over that time (the floor is those bytes
at the machine's read bandwidth).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench cpu-attention", description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[160, 1000])
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.ragged_paged_attention.cpu_kernel import target_name
    from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla

    if target_name() is None:
        raise SystemExit("the CPU attention kernel cannot be built here (no C++ compiler?)")
    kv_heads, q_heads, head_dim, page, capacity = 3, 9, 64, 16, 2048
    rng = np.random.default_rng(0)
    print(f"default model's attention shapes, float32, one layer; median of {args.repeats}")
    print("| sequences | context | XLA path ms | + C++ decode kernel ms | speed-up | K/V MB read |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seqs in args.seqs:
        pages_per_seq = capacity // page
        pool = seqs * pages_per_seq + 1
        k = jnp.asarray(rng.standard_normal((kv_heads, pool, page, head_dim), np.float32))
        v = jnp.asarray(rng.standard_normal((kv_heads, pool, page, head_dim), np.float32))
        table = jnp.asarray(rng.permutation(pool)[: seqs * pages_per_seq].reshape(seqs, pages_per_seq).astype(np.int32))
        q = jnp.asarray(rng.standard_normal((seqs, q_heads, head_dim), np.float32))
        cu = jnp.arange(seqs + 1, dtype=jnp.int32)
        for ctx in args.contexts:
            kv_lens = jnp.full((seqs,), ctx, jnp.int32)
            times = []
            for kernel in (False, True):
                f = jax.jit(lambda q, k, v, kernel=kernel: ragged_paged_attention_xla(
                    q, k, v, kv_lens, table, cu, jnp.asarray(seqs, jnp.int32), sm_scale=head_dim**-0.5,
                    cpu_kernel=kernel))
                f(q, k, v).block_until_ready()
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    f(q, k, v).block_until_ready()
                    runs.append(time.perf_counter() - t0)
                times.append(statistics.median(runs) * 1e3)
            read_mb = 2 * seqs * ctx * kv_heads * head_dim * 4 / 1e6
            print(f"| {seqs} | {ctx} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.1f}x | {read_mb:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
