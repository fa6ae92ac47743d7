"""Tensor-parallel overhead on fake CPU devices: `python -m ferrum_jax.bench tp`.

All "devices" share the same CPU cores, so this measures what partitioning and the
collectives cost, not a speed-up: the per-step time of TP=2/4/8 relative to TP=1, for a
decode step (batch 8) and a prefill step (256 tokens), on the ~125M Llama config with
random weights (16 query heads of 48 so that 8 divides them; 4 KV heads, replicated at
TP=8). It also counts the collectives in each compiled step's HLO, where the layer loop's
body appears once: its collectives run once per layer.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

FAKE_DEVICES = 8


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench tp", description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a 2-layer config instead of the ~125M one")
    args = p.parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={FAKE_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        # Fake devices exist only if XLA sees the flag before jax starts: restart with it.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        os.execve(sys.executable, [sys.executable, "-m", "ferrum_jax.bench", "tp", *(argv or [])], env)

    import jax
    import numpy as np

    import ferrum_jax as fj
    from ferrum_jax.batch.ragged import SequenceChunk, build_ragged_batch
    from ferrum_jax.models.config import ModelConfig

    layers = 2 if args.quick else 12
    cfg = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_layers=layers, num_heads=16, num_kv_heads=4, head_dim=48)
    limits = dict(dtype="float32", max_batch_size=8, max_sequence_length=512, page_size=16, max_num_batched_tokens=256)

    def time_step(ex, chunks):
        batch, _, _ = build_ragged_batch(chunks, ex.buckets, ex.page_size)
        logits, ex._kv = ex._step(ex._state, ex._kv, batch, ex._no_feed)
        jax.block_until_ready(logits)
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            logits, ex._kv = ex._step(ex._state, ex._kv, batch, ex._no_feed)
            jax.block_until_ready(logits)
            samples.append(time.perf_counter() - t0)
        hlo = ex._step.lower(ex._state, ex._kv, batch, ex._no_feed).compile().as_text()
        ops = re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo)
        return statistics.median(samples), ops

    rows = []
    for tp in args.sizes:
        ex = fj.JaxModelExecutor.from_config(cfg, seed=0, tensor_parallel_size=tp, **limits)
        pages = [list(range(1, 17))]  # one KV group: a llama
        decode = [SequenceChunk(np.array([5], np.int32), np.array([200], np.int32), 200, pages, "last") for _ in range(8)]
        prefill = [SequenceChunk(np.arange(256, dtype=np.int32), np.arange(256, dtype=np.int32), 0, pages, "last")]
        t_dec, ops = time_step(ex, decode)
        t_pre, _ = time_step(ex, prefill)
        rows.append((tp, t_dec, t_pre, ops))
        del ex

    base_dec, base_pre = rows[0][1], rows[0][2]
    print(f"machine: {os.cpu_count()} CPU cores shared by {FAKE_DEVICES} fake devices; jax {jax.__version__}")
    print(f"model: Llama {layers} layers, hidden 768, 16 q / 4 kv heads of 48, vocab 32000, float32; median of {args.repeats}")
    print("| TP | decode step (8 seqs) vs TP=1 | prefill step (256 tok) vs TP=1 | collectives in the HLO | per layer |")
    print("|---|---|---|---|---|")
    for tp, t_dec, t_pre, ops in rows:
        kinds = {k: ops.count(k) for k in sorted(set(ops))} or {"none": 0}
        per_layer = len(ops) - (1 if ops else 0)
        print(f"| {tp} | {t_dec / base_dec:.2f}x | {t_pre / base_pre:.2f}x | {kinds} | {per_layer:g} (+1 embedding) |")


if __name__ == "__main__":
    main()
