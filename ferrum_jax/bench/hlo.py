"""The compiled batch-1 decode step of the default model (or `--model`), for `../shared/perf/hlo_bytes.py`.

    python -m ferrum_jax.bench hlo --max-seq 512 --out step.hlo
    python ../shared/perf/hlo_bytes.py step.hlo

SmolLM2-135M-Instruct in float32 (`--quantization int8|int4`: quantized weights), `max_batch_size` 8, one sequence after a 40-token prompt
decoding one token: the step program `build_ragged_batch` picks for it is lowered, compiled,
written as HLO text, and its `cost_analysis()` flops and bytes accessed are printed.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench hlo", description=__doc__.split("\n")[0])
    p.add_argument("--max-seq", type=int, default=512, help="executor max_sequence_length")
    p.add_argument("--out", default="step.hlo", help="where the HLO text goes")
    p.add_argument("--quantization", choices=["int8", "int4"], help="quantized weights (default float32)")
    p.add_argument("--model", default="smollm2-135m", help="a packaged model (ferrum_jax.packaged_models) or a checkpoint path")
    args = p.parse_args(argv)

    import ferrum_jax as fj
    from ferrum_jax.batch.ragged import SequenceChunk, build_ragged_batch

    from ferrum_jax.packaged_models import PACKAGED

    ex = fj.JaxModelExecutor.from_pretrained(
        PACKAGED[args.model]() if args.model in PACKAGED else args.model, dtype="float32", max_batch_size=8, max_sequence_length=args.max_seq, progress=False,
        quantization=args.quantization,
    )
    prompt = asyncio.run(ex.prefill(fj.PrefillInput(input_ids=np.arange(1, 41, dtype=np.int32)[None])))
    tables = prompt.kv_cache.page_tables  # position 40 still falls in the prompt's last page
    chunk = SequenceChunk(token_ids=np.array([7], np.int32), positions=np.array([40], np.int32), kv_offset=40,
                          page_tables=tables, logits="last")  # fmt: skip
    batch, shape, _ = build_ragged_batch([chunk], ex.buckets, ex.page_size)
    compiled = ex._step.lower(ex._state, ex._kv, batch, ex._no_feed).compile()
    with open(args.out, "w") as f:
        f.write(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"{shape}: {cost.get('flops', 0) / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 1e9:.3f} GB accessed; HLO in {args.out}")


if __name__ == "__main__":
    main()
