"""`python -m ferrum_jax.convert HF_DIR OUT_DIR [--dtype bfloat16]`: HF safetensors -> a
ferrum orbax checkpoint that `from_pretrained(OUT_DIR, tensor_parallel_size=N)` restores
directly into the sharded layout (each device reads only its shard)."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.convert", description=__doc__)
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    p.add_argument("out_dir", help="where the orbax checkpoint is written")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype of the checkpoint (default bfloat16)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices to spread the conversion over")
    args = p.parse_args(argv)

    import ferrum_jax as fj

    ex = fj.JaxModelExecutor.from_pretrained(
        args.hf_dir, dtype=args.dtype, max_batch_size=1, max_sequence_length=16, num_pages=2,
        max_num_batched_tokens=16, tensor_parallel_size=args.tensor_parallel_size,
    )
    ex.save_checkpoint(args.out_dir)
    print(f"wrote {args.out_dir} ({ex.info().num_parameters:,} parameters, {args.dtype})")


if __name__ == "__main__":
    main()
