"""The CPU forms of a mixture of experts' expert MLPs, side by side: `python -m ferrum_jax.bench moe-forms`.

A loop over 24 stacked layers of the `--moe` benchmark's experts (64 experts of 1024 -> 256 ->
1024, top-8, float32: 4.8 GB of stacks) at several token counts, each form of models.moe on the
same routing (random, so about `64 x (1 - (63/64)^pairs)` distinct experts a layer): the C++
kernel reading the stacks in place, the gathered form (each pair's weights gathered) and the
blocked form. Reported: median ms of `--repeats` runs after a warm one, and the weight-stream
floor of the distinct experts the routing reads (their bytes over the bandwidth `bench steps`
measures). It is what chose the kernel on CPU at every size, and its `kTiledMinRows`.
"""

from __future__ import annotations

import argparse
import statistics
import time

LAYERS, EXPERTS, HIDDEN, FFN, TOP_K = 24, 64, 1024, 256, 8


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench moe-forms", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 256, 512])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ferrum_jax.bench.steps import stream_gbps
    from ferrum_jax.models.layer_slice import LayerSlice
    from ferrum_jax.models.moe import _blocked, _gathered, _in_place_cpu, num_blocks, row_block

    key = jax.random.split(jax.random.PRNGKey(0), 3)
    shapes = ((LAYERS, EXPERTS, HIDDEN, FFN),) * 2 + ((LAYERS, EXPERTS, FFN, HIDDEN),)
    stacks = tuple(jax.random.normal(k, s, jnp.float32) * 0.03 for k, s in zip(key, shapes))
    expert_bytes = 3 * HIDDEN * FFN * 4

    def looped(form):
        @jax.jit
        def run(x, experts, weights, gate, up, down):
            def layer(i, x):
                w = tuple(LayerSlice(s, i) for s in (gate, up, down))
                return x + form(x, experts[i], weights[i], w)
            return jax.lax.fori_loop(0, LAYERS, layer, x)
        return run

    forms = {
        "in place (C++)": looped(lambda x, e, w, s: _in_place_cpu(x, e, w, s, None)),
        "gathered": looped(lambda x, e, w, s: _gathered(x, e, w, s, jax.nn.silu)),
        "blocked": looped(lambda x, e, w, s: _blocked(x, e, w, s, jax.nn.silu,
                                                     row_block(e.size, EXPERTS))),
    }
    gbps = stream_gbps()
    rng = np.random.default_rng(0)
    print(f"weight stream {gbps:.1f} GB/s; {LAYERS} layers of {EXPERTS} experts, top-{TOP_K}, "
          f"{expert_bytes / 1e6:.1f} MB an expert")
    print(f"| tokens | pairs/expert | distinct experts/layer | floor ms | {' ms | '.join(forms)} ms |")
    print("|---:|---:|---:|---:|" + "---:|" * len(forms))
    for t in args.tokens:
        experts = np.stack([np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(t)]) for _ in range(LAYERS)])
        weights = rng.uniform(0.05, 0.2, size=(LAYERS, t, TOP_K)).astype(np.float32)
        x = jnp.asarray(rng.normal(size=(t, HIDDEN)), jnp.float32)
        distinct = np.mean([len(np.unique(e)) for e in experts])
        floor = LAYERS * distinct * expert_bytes / gbps / 1e6
        times = []
        for name, fn in forms.items():
            if name == "gathered" and t * TOP_K > num_blocks(t * TOP_K, EXPERTS, row_block(t * TOP_K, EXPERTS)):
                times.append(float("nan"))  # models.moe never picks it here
                continue
            a = (x, jnp.asarray(experts, jnp.int32), jnp.asarray(weights), *stacks)
            fn(*a).block_until_ready()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(*a).block_until_ready()
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs) * 1e3)
        cells = " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in times)
        print(f"| {t} | {t * TOP_K / EXPERTS:.2f} | {distinct:.1f} | {floor:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
