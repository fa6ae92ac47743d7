"""Which int4 matmul forms XLA fuses on an accelerator: `python -m ferrum_jax.bench int4-forms`.

Compile-only (no device): one Llama-3-8B MLP weight, `[4096, 14336]`, in affine int4 with groups
of 128 inputs, contracted with `--tokens` rows of bfloat16 activations, for `--target`. Three
forms, each over weights stored as XLA's own `uint4` (packed two to a byte by the compiler) and,
for comparison, as `int8` codes:
  plain dot * scale     one dot over the converted codes, a per-channel scale on the result
                        (what per-channel int8 does; the reference for "fused")
  grouped partial dots  per-group dots `[groups, tokens, out]`, then the steps and offsets
                        (what `models.quantization.project` does for int4 on few tokens)
  dequantize then dot   the float weight built first, then one dot
Reported: XLA's temporary bytes per program. A weight-sized temporary (112 MiB in bfloat16,
224 MiB in float32) means the dequantized weight was written out instead of fed to the matmul.

`--target cpu` instead times, on this machine, the forms `project` picks between: a 30-layer
chain of SmolLM2-135M-sized weights in groups of 32 (float32 activations, plain jit), int4 held
as packed nibbles (the CPU form) and as `uint4` (TPU's, see `models.int4_codes`), and grouped
int8 (GGUF Q8_0's form) through `project` and dequantized before one dot.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench int4-forms", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="tpu-v6e-1")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16])
    args = p.parse_args(argv)
    if args.target == "cpu":
        time_cpu_forms(args.tokens)
        return

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from ferrum_jax.aot.targets import get_target

    device = get_target(args.target).devices()[0]
    sharding = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
    k, n, groups = 4096, 14336, 4096 // 128

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def plain(x, q, step, offset):
        y = jnp.dot(x, q.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * step[0]
        return y.astype(jnp.bfloat16)

    def grouped(x, q, step, offset):
        x_g = x.reshape(x.shape[0], groups, k // groups).transpose(1, 0, 2)
        partial = jnp.einsum("gti,gio->gto", x_g, q.reshape(groups, k // groups, n).astype(jnp.bfloat16),
                             preferred_element_type=jnp.float32)
        y = jnp.einsum("gto,go->to", partial, step) + jnp.einsum("gt,go->to", x_g.sum(-1).astype(jnp.float32), offset)
        return y.astype(jnp.bfloat16)

    def dequantized(x, q, step, offset):
        w = q.reshape(groups, k // groups, n).astype(jnp.bfloat16) * step[:, None].astype(jnp.bfloat16)
        w = (w + offset[:, None].astype(jnp.bfloat16)).reshape(k, n)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    forms = {"plain dot * scale": plain, "grouped partial dots": grouped, "dequantize then dot": dequantized}
    print(f"{args.target}: [{k}, {n}] int4 weight, groups of 128; XLA temporary MiB per program")
    print("| tokens | form | uint4 weights | int8 codes |")
    print("|---:|---|---:|---:|")
    for tokens in args.tokens:
        for name, form in forms.items():
            temps = []
            for codes in (jnp.uint4, jnp.int8):
                compiled = jax.jit(form).lower(spec((tokens, k), jnp.bfloat16), spec((k, n), codes),
                                               spec((groups, n), jnp.float32), spec((groups, n), jnp.float32)).compile()
                temps.append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
            print(f"| {tokens} | {name} | {temps[0]:.1f} | {temps[1]:.1f} |", flush=True)


def time_cpu_forms(token_counts: list[int], layers: int = 30, repeats: int = 5) -> None:
    import os
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ferrum_jax.models import int4_codes
    from ferrum_jax.models.quantization import Quantization, dequantize_groups, project, quantize

    def through_project(x, w, s):
        body = lambda i, acc: acc + project(x, nnx.Param(w[i]), nnx.Param(s[i]), 1, jnp.float32).sum()  # noqa: E731
        return jax.lax.fori_loop(0, layers, body, 0.0)

    def dequantized(x, w, s):
        body = lambda i, acc: acc + (x @ dequantize_groups(w[i], s[i], 1, jnp.float32)).sum()  # noqa: E731
        return jax.lax.fori_loop(0, layers, body, 0.0)

    rng = np.random.default_rng(0)
    print(f"XLA:CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; ms per {layers}-layer chain, best of {repeats}")
    print("| weight [in, out] | tokens | int4 packed | int4 uint4 | grouped int8, project | grouped int8, dequantize then dot |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        w = rng.normal(size=(layers, k, n)).astype(np.float32)
        packed, step = jax.jit(jax.vmap(lambda w: quantize(w, 1, Quantization("int4", 32))))(w)
        int8, scale = jax.jit(jax.vmap(lambda w: quantize(w, 1, Quantization("int8", 32))))(w)
        uint4 = jax.jit(lambda p: int4_codes.unpack(p, 1, 1, k // 32))(packed)
        cases = [(through_project, packed, step), (through_project, uint4, step), (through_project, int8, scale), (dequantized, int8, scale)]
        for t in token_counts:
            x = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
            ms = []
            for fn, codes, scales in cases:
                chain = jax.jit(fn)
                chain(x, codes, scales).block_until_ready()
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    chain(x, codes, scales).block_until_ready()
                    best = min(best, time.perf_counter() - t0)
                ms.append(best * 1e3)
            print(f"| [{k}, {n}] | {t} | " + " | ".join(f"{v:.2f}" for v in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
