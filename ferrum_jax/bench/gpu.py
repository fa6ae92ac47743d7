"""Decode and prefill throughput of a Llama-3-8B-shaped model on this machine's accelerator, with
random bfloat16 weights (nothing downloaded, nothing installed by hand), against the roofline.

    python -m ferrum_jax.bench gpu --out gpu.json            # on a GPU (or TPU) machine
    JAX_PLATFORMS=cpu python -m ferrum_jax.bench gpu --smoke # on CPU: the script runs (tiny model)

Per attention implementation (the platform's Pallas kernel, then the XLA path): the executor is
built from `configs/models/llama-3-8b` (`--model`) with seeded random weights, its decode and
prefill programs compiled ahead (`warmup`, timed), `--context` tokens of KV written for each of
max(--batches) sequences; then, per batch size, engine-shaped decode steps (`launch_unified` +
`collect`: one forward and the on-device sampler, only the sampled ids come back), each
step's KV rolled back so every repeat sees the same contexts, the median of `--repeats`; and one
`--prefill`-token prompt. Bandwidth: (weight bytes + the KV the step reads) / step time, as a
share of the chip's HBM bandwidth (ferrum_jax.aot.targets by device kind) where it is known.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ferrum_jax.chips import chip_of

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "configs" / "models" / "llama-3-8b"), help="a directory with config.json")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--context", type=int, default=1024, help="KV tokens each decoding sequence holds")
    p.add_argument("--prefill", type=int, default=2048, help="tokens of the timed prompt")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--attention", nargs="+", default=["pallas", "xla"])
    p.add_argument("--out", type=Path, help="write every figure here as JSON")
    p.add_argument("--smoke", action="store_true", help="the tiny preset, small shapes, 2 repeats (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.context, args.prefill, args.repeats = [1, 2], 24, 32, 2

    import jax

    from ferrum_jax.executor.presets import load_preset
    from ferrum_jax.models import registry

    cfg = load_preset("tiny").model if args.smoke else registry.model_config_from_dir(args.model)
    device = jax.devices()[0]
    peak = _hbm_gbps(device.device_kind)
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; model {cfg.num_layers} layers x "
          f"{cfg.hidden_size}; HBM {peak or '?'} GB/s")
    results = {"device": device.device_kind, "jax": jax.__version__, "hbm_gbps": peak, "runs": []}
    for attention in args.attention:
        results["runs"].append(run(cfg, attention, args, peak))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def run(cfg, attention: str, args, peak: float | None) -> dict:
    import asyncio

    import numpy as np

    from ferrum_jax.executor.jax_executor import JaxModelExecutor
    from ferrum_jax.interfaces import UnifiedBatchItem
    from ferrum_jax.kv.pages import kv_bytes_per_token
    from ferrum_jax.models.param_tree import state_nbytes
    from ferrum_jax.step.sampling import SamplingRow

    max_batch = max(args.batches)
    t0 = time.perf_counter()
    ex = JaxModelExecutor.from_config(
        cfg, seed=0, attention=attention, max_batch_size=max_batch, max_sequence_length=args.context + args.prefill + 8,
        max_num_batched_tokens=max(args.prefill, max_batch, 16),
    )
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    asyncio.run(ex.warmup(["logits_last", "sample"]))
    warmup = time.perf_counter() - t0
    weights = state_nbytes(ex._state)
    rng = np.random.default_rng(0)
    handles = [ex.new_kv_cache() for _ in range(max_batch)]
    for h in handles:
        ex.extend([(h, rng.integers(1, cfg.vocab_size, args.context).tolist())], "last")

    def decode(b: int) -> float:
        items = [UnifiedBatchItem(f"s{i}", [int(rng.integers(1, cfg.vocab_size))], h, h.num_tokens, True) for i, h in enumerate(handles[:b])]
        t = time.perf_counter()
        ex.collect(ex.launch_unified(items, [SamplingRow() for _ in items]))
        t = time.perf_counter() - t
        for h in handles[:b]:
            ex.truncate(h, h.num_tokens - 1)
        return t

    row = {"attention": ex.attention_impl, "build_s": round(built, 1), "warmup_s": round(warmup, 1), "weight_bytes": weights,
           "decode": [], "prefill": None}
    print(f"\n{ex.attention_impl}: built in {built:.1f} s, warmup (compile) {warmup:.1f} s, weights {weights / 2**30:.2f} GiB")
    print("| decode batch | ms / step | tok/s | GB/s | of HBM |\n|---:|---:|---:|---:|---:|")
    for b in args.batches:
        decode(b), decode(b)
        ms = statistics.median(decode(b) for _ in range(args.repeats)) * 1e3
        moved = weights + b * args.context * cfg.num_layers * kv_bytes_per_token(cfg, ex.kv_dtype)
        gbps = moved / ms / 1e6
        share = f"{100 * gbps / peak:.0f}%" if peak else "?"
        row["decode"].append({"batch": b, "ms": round(ms, 3), "tokens_per_s": round(b / ms * 1e3, 1), "gbps": round(gbps, 1)})
        print(f"| {b} | {ms:.2f} | {b / ms * 1e3:.1f} | {gbps:.0f} | {share} |", flush=True)
    prompt = rng.integers(1, cfg.vocab_size, args.prefill).tolist()
    times = []
    for _ in range(max(2, args.repeats // 5) + 1):
        h = ex.new_kv_cache()
        t = time.perf_counter()
        ex.extend([(h, prompt)], "last")
        times.append(time.perf_counter() - t)
        ex.release_cache(h.cache_id)
    s = statistics.median(times[1:])
    row["prefill"] = {"tokens": args.prefill, "s": round(s, 4), "tokens_per_s": round(args.prefill / s, 1)}
    print(f"prefill {args.prefill} tokens: {s * 1e3:.1f} ms, {args.prefill / s:.0f} tok/s")
    for h in handles:
        ex.release_cache(h.cache_id)
    return row


def _hbm_gbps(device_kind: str) -> float | None:
    """The chip's HBM bandwidth (ferrum_jax.chips), by device kind."""
    chip = chip_of(device_kind)
    return chip.hbm_gbps if chip else None

if __name__ == "__main__":
    main()
