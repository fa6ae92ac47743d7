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
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench int4-forms", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="tpu-v6e-1")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16])
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    main()
