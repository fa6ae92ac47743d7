"""Compile the ragged paged attention kernel of a target's platform over a matrix of cases.

    python -m ferrum_jax.aot.kernel_check --target tpu-v6e-1     # Mosaic
    python -m ferrum_jax.aot.kernel_check --target gpu-h100      # Triton -> PTX -> ptxas (sm_90a)

The cases cover every value of each dimension the kernels specialise on, most pairs of them:
dtype (bfloat16, float32), head_dim (64, 128), GQA group (1, 4, 8), page size (16, 32), a
decode-only and a prefill-heavy batch, and the static options (sliding window, soft cap).
Prints one line per case and exits 1 if any fails to compile. A Triton failure can abort the
process rather than raise, so run one target per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ferrum_jax.aot.targets import TARGETS, get_target
from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.dispatch import fp8_supported

NUM_KV_HEADS = 2
NUM_PAGES = 512
# How each platform's Pallas kernel appears in compiled HLO.
KERNEL_CALLS = {"tpu": 'custom_call_target="tpu_custom_call"', "gpu": 'custom_call_target="__gpu$xla.gpu.triton"'}


@dataclasses.dataclass(frozen=True)
class KernelCase:
    dtype: str
    head_dim: int
    group: int
    page_size: int
    batch: str  # "decode": 64 sequences of one token; "prefill": 1024 tokens of 4 sequences
    sliding_window: int | None = None
    soft_cap: float | None = None
    kv_dtype: str | None = None  # the pages' dtype when narrower than the queries' (int8, fp8 KV)

    @property
    def name(self) -> str:
        opts = "".join(["_window" if self.sliding_window else "", "_softcap" if self.soft_cap else "",
                        f"_kv{jnp.dtype(self.kv_dtype).name}" if self.kv_dtype else ""])  # fmt: skip
        return f"{self.dtype}_d{self.head_dim}_g{self.group}_p{self.page_size}_{self.batch}{opts}"


CASES = (
    KernelCase("bfloat16", 128, 4, 16, "decode"),
    KernelCase("bfloat16", 128, 8, 32, "prefill", sliding_window=256),
    KernelCase("bfloat16", 64, 1, 16, "prefill", sliding_window=128, soft_cap=30.0),
    KernelCase("float32", 128, 1, 32, "decode", sliding_window=512, soft_cap=50.0),
    KernelCase("float32", 64, 4, 32, "prefill"),
    KernelCase("float32", 64, 8, 16, "decode", sliding_window=64),
    KernelCase("bfloat16", 64, 8, 32, "decode"),
    KernelCase("float32", 128, 4, 16, "prefill", soft_cap=30.0),
    KernelCase("bfloat16", 128, 4, 16, "decode", kv_dtype="float8_e4m3fn"),
    KernelCase("bfloat16", 128, 8, 32, "prefill", kv_dtype="float8_e4m3fn"),
    KernelCase("bfloat16", 128, 4, 16, "decode", kv_dtype="int8"),
    KernelCase("bfloat16", 128, 8, 32, "prefill", kv_dtype="int8"),
)


def compile_case(case: KernelCase, device) -> float:
    """Seconds to lower and compile `case` for `device`; raises what the compiler raises."""
    tokens, seqs = (64, 64) if case.batch == "decode" else (1024, 4)
    pages_per_seq = 2048 // case.page_size
    dtype = jnp.dtype(case.dtype)
    sharding = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    pages = spec((NUM_KV_HEADS, NUM_PAGES, case.page_size, case.head_dim), jnp.dtype(case.kv_dtype or case.dtype))
    args = (
        spec((tokens, NUM_KV_HEADS * case.group, case.head_dim), dtype), pages, pages,
        spec((seqs,), jnp.int32), spec((seqs, pages_per_seq), jnp.int32), spec((seqs + 1,), jnp.int32),
        spec((), jnp.int32),
    )  # fmt: skip
    fn = jax.jit(lambda *a: ragged_paged_attention(
        *a, sm_scale=case.head_dim**-0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap,
        platform=device.platform,
    ))  # fmt: skip
    t0 = time.perf_counter()
    hlo = fn.lower(*args).compile().as_text()
    seconds = time.perf_counter() - t0
    if KERNEL_CALLS[device.platform] not in hlo:
        raise RuntimeError(f"no {KERNEL_CALLS[device.platform]} call in the compiled program: the kernel was not used")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.aot.kernel_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    args = p.parse_args(argv)
    device = get_target(args.target).devices()[0]
    failed = 0
    for case in CASES:
        if case.kv_dtype == "float8_e4m3fn" and not fp8_supported(device):
            print(f"skipped {case.name}: fp8 KV on compute capability {device.compute_capability} (Triton needs >= 8.9)")
            continue
        try:
            print(f"ok {case.name} {compile_case(case, device):.2f}s", flush=True)
        except Exception as e:  # the compiler's own error, whatever its type
            failed += 1
            print(f"FAILED {case.name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
