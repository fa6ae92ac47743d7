"""`python -m ferrum_jax.convert SRC OUT_DIR [--dtype DTYPE] [--quantization int8|int4]`: a HF
safetensors directory or a GGUF file -> a ferrum orbax checkpoint that
`from_pretrained(OUT_DIR, tensor_parallel_size=N)` restores directly into the sharded layout (each
device reads only its shard).

The checkpoint keeps the dtype the source holds (a GGUF file's quantized tensors dequantize to
float32) unless `--dtype` asks for another; `from_pretrained(OUT_DIR, dtype=X)` can still cast.
`--quantization` stores the linear layers' weights quantized (integers + float32 scales), and
the checkpoint restores quantized."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.convert", description=__doc__)
    p.add_argument("src", help="HF directory (config.json + *.safetensors), or a .gguf file (or a directory holding one)")
    p.add_argument("out_dir", help="where the orbax checkpoint is written")
    p.add_argument("--dtype", help="parameter dtype of the checkpoint (default: the source's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices to spread the conversion over")
    p.add_argument("--quantization", choices=["int8", "int4"], help="quantize the linear layers' weights (default: keep them float)")
    args = p.parse_args(argv)

    import ferrum_jax as fj
    from ferrum_jax.executor.loading import source_dtype

    dtype = args.dtype or source_dtype(args.src)
    ex = fj.JaxModelExecutor.from_pretrained(
        args.src, dtype=dtype, max_batch_size=1, max_sequence_length=16, num_pages=2,
        max_num_batched_tokens=16, tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
    )  # fmt: skip
    ex.save_checkpoint(args.out_dir)
    q = ex.quantization
    quant = "" if q is None else f", {q.method} weights" + (f" in groups of {q.group_size}" if q.group_size else "")
    print(f"wrote {args.out_dir} ({ex.info().num_parameters:,} parameters, {dtype}{quant})")


if __name__ == "__main__":
    main()
