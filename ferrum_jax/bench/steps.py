"""Step time by batch composition on the default model: `python -m ferrum_jax.bench steps`.

SmolLM2-135M-Instruct (the default GGUF) in float32, the server's limits (32 sequences,
max_model_len 2048, 512 batched tokens, page 16). 32 sequences hold a 160-token context; each
case runs one engine-shaped step (`extend`, which plans exactly the steps `sample_unified`
would) and rolls the KV back, so every repeat sees the same contexts. Reported: the median
wall time of `--repeats` runs after two warm ones (compilation excluded). With
`--no-attention` the attention is replaced by the identity, which leaves the GEMMs, the KV
write and everything else: the difference is what attention costs in that step.

Decode steps also get their floor on this machine: the weights and the KV they read over the
bandwidth XLA:CPU streams a weight at here (a float32 matvec over a 512 MiB matrix, best of 5),
and what the compiled program writes per step besides (aot.hlo_traffic: each instruction's
result, once per loop trip; the KV write and logits included), where the time above the floor
goes. Unlike on an accelerator those writes are mostly small per-layer temporaries that stay in
the CPU's caches, so they cost copy time, not DRAM traffic, and the floor leaves them out.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench steps", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-attention", action="store_true", help="attention replaced by the identity")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"], help="the KV pages' dtype")
    args = p.parse_args(argv)

    import numpy as np

    from ferrum_jax.aot.hlo_traffic import traffic
    from ferrum_jax.default_model import default_model_path
    from ferrum_jax.kv.pages import kv_bytes_per_token
    from ferrum_jax.models.param_tree import state_nbytes
    from ferrum_jax.executor.jax_executor import JaxModelExecutor

    if args.no_attention:
        import ferrum_jax.models.paged_attention as paged_attention

        paged_attention.ragged_paged_attention_xla = lambda q, *_, **__: q * 1.0
    ex = JaxModelExecutor.from_pretrained(default_model_path(), dtype="float32", progress=False,
                                          kv_cache_dtype=args.kv_cache_dtype)
    rng = np.random.default_rng(0)

    def tokens(n):
        return rng.integers(100, 40000, n).tolist()

    ctx = [ex.new_kv_cache() for _ in range(32)]
    ex.extend([(h, tokens(160)) for h in ctx[:16]], "last")
    ex.extend([(h, tokens(160)) for h in ctx[16:]], "last")
    fresh = [ex.new_kv_cache() for _ in range(4)]
    cases = {
        "decode, 1 sequence": lambda: [(ctx[0], tokens(1))],
        "decode, 32 sequences": lambda: [(h, tokens(1)) for h in ctx],
        "mixed, 31 decodes + a 481-token chunk": lambda: [(h, tokens(1)) for h in ctx[:31]] + [(fresh[0], tokens(481))],
        "mixed, 28 decodes + 4 chunks of 121": lambda: [(h, tokens(1)) for h in ctx[:28]] + [(f, tokens(121)) for f in fresh],
        "prefill, 4 prompts of 128": lambda: [(f, tokens(128)) for f in fresh],
        "prefill, 1 prompt of 512": lambda: [(fresh[0], tokens(512))],
    }
    gbps = stream_gbps()
    weights = state_nbytes(ex._state)
    print(f"default model, float32, {args.kv_cache_dtype} KV pages; "
          f"{'attention replaced by the identity; ' if args.no_attention else ''}median of {args.repeats}; "
          f"weight stream {gbps:.1f} GB/s, weights {weights / 1e6:.0f} MB")
    print("| step | tokens | ms | roofline ms | written per step (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, make in cases.items():
        def run():
            items = make()
            ex.extend(items, "last")
            for h, t in items:
                ex.truncate(h, ex._seqs.lookup(h).num_tokens - len(t))
            return sum(len(t) for _, t in items)

        run(), run()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = run()
            times.append(time.perf_counter() - t0)
        roof = written = ""
        if name.startswith("decode"):
            shape = ex.buckets.shape_for(n, n, False)
            t = traffic(ex._programs[("step", shape)].as_text())
            kv_read = n * 160 * ex.cfg.num_layers * kv_bytes_per_token(ex.cfg, ex.kv_dtype)
            roof = f"{(weights + kv_read) / gbps * 1e3 / 1e9:.1f}"
            written = f"{t.written_bytes / 1e6:.0f}"
        print(f"| {name} | {n} | {statistics.median(times) * 1e3:.1f} | {roof} | {written} |", flush=True)


def stream_gbps(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """This machine's bandwidth for streaming a weight as XLA:CPU reaches it: a `[1, K] x [K, N]`
    float32 matvec over `nbytes` of matrix (it reads each byte once, on every core); best of
    `repeats`."""
    import jax
    import jax.numpy as jnp

    k = 8192
    w = jnp.ones((k, nbytes // 4 // k), jnp.float32)
    x = jnp.ones((1, k), jnp.float32)
    matvec = jax.jit(lambda x, w: x @ w)
    matvec(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matvec(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
