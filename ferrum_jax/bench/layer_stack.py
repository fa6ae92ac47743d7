"""What reading decoder weights out of a stacked array costs on XLA:CPU: `python -m ferrum_jax.bench layer-stack`.

The decoder's weights are stacked `[layers, ...]` and a layer loop indexes them (models.layer_slice);
XLA:CPU writes each layer's slice out before its dot (aot.hlo_traffic on the default model's
decode step: 427 MB a step). This times the default model's seven projections per layer (SmolLM2-
135M: hidden 576, 9 x 64 query and 3 x 64 KV heads, MLP 1536, 30 layers, float32; attention left
out) at batch 1 and 32 three ways: a `lax.scan` over the stacks (the model's form), the same
layers unrolled over static slices of the stacks, and unrolled over 210 separate arrays (no
stack). Reported: median ms of `--repeats` runs after a warm one, and the weight-stream floor
(the weights' bytes over the bandwidth `bench steps` measures).
"""

from __future__ import annotations

import argparse
import statistics
import time

LAYERS, HIDDEN, MLP, Q, KV = 30, 576, 1536, 576, 192
# (name, in, out): q, k, v, o, gate, up, down
PROJECTIONS = (("q", HIDDEN, Q), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", Q, HIDDEN), ("gate", HIDDEN, MLP),
               ("up", HIDDEN, MLP), ("down", MLP, HIDDEN))  # fmt: skip


def _layer(x, w):
    """One layer's projections on x `[rows, hidden]`, w a dict of `[in, out]` weights."""
    import jax

    q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
    x = x + q @ w["o"] + 1e-3 * (k.sum() + v.sum())
    return x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench layer-stack", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ferrum_jax.bench.steps import stream_gbps

    rng = np.random.default_rng(0)
    stacks = {n: jnp.asarray(rng.normal(0, 0.02, (LAYERS, i, o)), jnp.float32) for n, i, o in PROJECTIONS}
    separate = [{n: jnp.asarray(np.asarray(s[layer])) for n, s in stacks.items()} for layer in range(LAYERS)]

    @jax.jit
    def scanned(x, stacks):
        return jax.lax.scan(lambda x, w: (_layer(x, w), None), x, stacks)[0]

    @jax.jit
    def static_slices(x, stacks):
        for layer in range(LAYERS):
            x = _layer(x, {n: s[layer] for n, s in stacks.items()})
        return x

    @jax.jit
    def unstacked(x, layers):
        for w in layers:
            x = _layer(x, w)
        return x

    weight_bytes = sum(s.nbytes for s in stacks.values())
    gbps = stream_gbps()
    print(f"{weight_bytes / 1e6:.0f} MB of weights; weight stream {gbps:.1f} GB/s: floor {weight_bytes / gbps / 1e6:.1f} ms")
    print("| rows | scan over stacks ms | unrolled, static slices ms | unrolled, separate arrays ms |\n|---:|---:|---:|---:|")
    for rows in (1, 32):
        x = jnp.asarray(rng.normal(size=(rows, HIDDEN)), jnp.float32)
        times = []
        for fn, w in ((scanned, stacks), (static_slices, stacks), (unstacked, separate)):
            fn(x, w).block_until_ready()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(x, w).block_until_ready()
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs) * 1e3)
        print(f"| {rows} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
