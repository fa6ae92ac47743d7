"""Compile a server's programs for a TPU or GPU from this (CPU) machine, and say whether it fits.

    python -m ferrum_jax.aot --target tpu-v6e-1 --model configs/models/llama-3-8b --max-model-len 8192
    python -m ferrum_jax.aot --target gpu-h100 --config configs/llama3_8b_gpu.yaml --model DIR --json out.json

Takes every `python -m ferrum_jax.serve` flag (and `--config` files) with the server's defaults;
those that shape programs (--max-model-len, --max-num-seqs, --max-num-batched-tokens,
--page-size, --num-pages, --dtype, --quantization, --tensor-parallel-size,
--enable-expert-parallel, --attention, the speculative ones) matter here. The model is read for its config only: a directory holding just
config.json, a GGUF file's metadata, or a preset (a quantized ferrum checkpoint also for its
quantization, which the server would restore). Compiles what the server's warmup would compile, on the
target's compile-only devices with its attention kernel, and prints per program the compile
time and per-device bytes (arguments, outputs, temporaries, peak) against the chip's usable
memory, then whether the configuration fits, with how many KV pages it could hold, and how many
copies of the KV pool the programs make (there should be none). Exits 1 if a program fails to
compile, the configuration does not fit, or a program copies the pool.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from ferrum_jax.batch.buckets import BucketSpec
from ferrum_jax.aot.hlo_checks import kv_pool_copies
from ferrum_jax.aot.roofline import DeviceWeights, decode_rooflines, program_roofline
from ferrum_jax.aot.programs import (
    CompiledProgram,
    Limits,
    compile_all,
    dump_hlo,
    kv_page_shape,
    program_set,
    target_mesh,
)
from ferrum_jax.aot.targets import GiB, TARGETS, Target, get_target
from ferrum_jax.executor.compile_cache import enable_persistent_cache
from ferrum_jax.executor.platform_defaults import default_dtype, default_max_num_batched_tokens
from ferrum_jax.executor.program_plan import PROGRAM_FAMILIES, num_programs, target_programs
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models import registry
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.kv.pages import kv_cache_dtype
from ferrum_jax.models.param_tree import abstract_model, flatten_state, param_shardings, unflatten_into
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.serve.settings import ServeSettings, parse_settings


def model_config(s: ServeSettings) -> ModelConfig:
    """The config of the model the server would load (a path, a packaged model's name, a preset)."""
    from ferrum_jax.executor.loading import hf_config_of
    from ferrum_jax.serve.loading import model_source

    source = model_source(s)
    if source.is_preset:
        from ferrum_jax.executor.presets import load_preset

        return load_preset(source.preset).model
    return registry.model_config(hf_config_of(source.path))


def resolve_limits(s: ServeSettings, target: Target, cfg: ModelConfig) -> Limits:
    """The server's settings with its defaults filled in for the target's platform and model."""
    from ferrum_jax.executor.jax_executor import JaxModelExecutor

    defaults = inspect.signature(JaxModelExecutor.__init__).parameters
    max_model_len = s.max_model_len or defaults["max_sequence_length"].default
    max_num_seqs = s.max_num_seqs or defaults["max_batch_size"].default
    page_size = s.page_size or defaults["page_size"].default
    max_num_batched_tokens = s.max_num_batched_tokens or default_max_num_batched_tokens(target.platform)
    return Limits(
        dtype=s.executor_dtype or default_dtype(target.platform),
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        page_size=page_size,
        num_pages=s.num_pages or kv_layout(cfg).default_num_pages(max_num_seqs, max_model_len, page_size, max_num_batched_tokens),
        tensor_parallel_size=s.tensor_parallel_size or 1,
        attention=s.attention or "auto",
        quantization=s.quantization or _stored_quantization(s),
        kv_cache_dtype=s.kv_cache_dtype,
        enable_expert_parallel=s.enable_expert_parallel,
    )


def _stored_quantization(s: ServeSettings) -> Quantization | None:
    """A quantized ferrum checkpoint's quantization, group size included (a checkpoint converted
    from GGUF blocks has groups of 32, whose scales weigh 4x those of 128): the server would
    restore it as stored."""
    from ferrum_jax.models.checkpoint import checkpoint_quantization, is_ferrum_checkpoint

    if s.model is None or not is_ferrum_checkpoint(s.model):
        return None
    return checkpoint_quantization(s.model)


def _describe(quant: Quantization | None) -> str | None:
    """"int8", "int4", or with a group size: "int8-g32"."""
    if quant is None:
        return None
    return quant.method if quant.group_size is None else f"{quant.method}-g{quant.group_size}"


def weights_per_device(cfg: ModelConfig, limits: Limits, devices: list) -> DeviceWeights:
    """The largest share of the parameters any one device holds (and of it the expert stacks)."""
    _, abstract = abstract_model(cfg, jnp.dtype(limits.dtype), limits.tensor_parallel_size, Quantization.parse(limits.quantization))
    mesh = target_mesh(devices, limits.tensor_parallel_size)
    shardings = unflatten_into(abstract, param_shardings(cfg, mesh, abstract, limits.expert_parallel))
    sizes = jax.tree.map(lambda a, sh: jax.dtypes.itemsize_bits(a.dtype) * _shard_elements(a.shape, sh) // 8, abstract, shardings)
    decls = registry.declarations(cfg)
    experts = sum(n for path, n in flatten_state(sizes).items() if decls.is_expert_stack(path))
    return DeviceWeights(int(sum(jax.tree.leaves(sizes))), int(experts))


def _shard_elements(shape, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape)))


def report(cfg: ModelConfig, limits: Limits, target: Target, programs: list[CompiledProgram], buckets: BucketSpec,
           weights: DeviceWeights, context_len: int) -> dict:
    """The summary printed and written to --json."""
    tp = limits.tensor_parallel_size
    pool_shape = kv_page_shape(cfg, limits)
    device_pool = (pool_shape[0] // tp, *pool_shape[1:])  # kv_rows is a multiple of tp
    itemsize = kv_cache_dtype(limits.kv_cache_dtype, limits.dtype).itemsize
    pool_bytes = 2 * itemsize * device_pool[0] * device_pool[1] * device_pool[2] * device_pool[3]
    page_bytes = pool_bytes // limits.num_pages
    peak = max(p.peak_bytes for p in programs)
    usable = target.usable_bytes
    layout = kv_layout(cfg)
    copies = {f"{p.kind}_{p.bucket}": kv_pool_copies(p.hlo, device_pool, layout.slots) for p in programs}
    # What one sequence at max_model_len holds, against a pool where every layer keeps every
    # position (the sliding-window saving of kv.layout).
    full_pages = -(-limits.max_model_len // limits.page_size)
    held = layout.pages_held(limits.max_model_len, limits.page_size, 1) * layout.slots
    sequence_ratio = held / (full_pages * cfg.num_layers)
    roofs = [program_roofline(cfg, limits, target, p, weights, context_len) for p in programs if p.shape is not None]
    return {
        "target": target.name,
        "limits": {**vars(limits), "quantization": _describe(Quantization.parse(limits.quantization))},
        "programs": [
            {"kind": p.kind, "bucket": p.bucket, "compile_s": round(p.seconds, 2), "argument_bytes": p.argument_bytes,
             "output_bytes": p.output_bytes, "alias_bytes": p.alias_bytes, "temp_bytes": p.temp_bytes,
             "peak_bytes": p.peak_bytes, "cost_model_bytes_body_once": p.cost_bytes, "cost_model_flops_body_once": p.cost_flops,
             "kv_pool_copies": len(copies[f"{p.kind}_{p.bucket}"])}
            for p in programs
        ],  # fmt: skip
        "compile_s": round(sum(p.seconds for p in programs), 1),
        "usable_bytes_per_device": usable,
        "weight_bytes_per_device": weights.total,
        "kv_pool_bytes_per_device": pool_bytes,
        "peak_bytes_per_device": peak,
        "fits": peak <= usable,
        "num_pages": limits.num_pages,
        "kv_layout": {"slots": layout.slots, "group_windows": list(layout.windows)},
        "kv_sequence_ratio": round(sequence_ratio, 4),
        "max_model_len_sequences": (limits.num_pages - 1) // layout.pages_held(limits.max_model_len, limits.page_size, 1),
        "max_num_pages": max(0, (usable - (peak - pool_bytes)) // page_bytes),
        "kv_pool_copies": sum(len(c) for c in copies.values()),
        "kv_pool_copy_lines": [line for c in copies.values() for line in c[:3]][:10],
        "context_len": context_len,
        "roofline": roofs,
        "decode": decode_rooflines(cfg, limits, target, programs, buckets, weights, context_len),
    }


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def print_roofline(r: dict, target: Target) -> None:
    print(f"\nroofline on {target.name} ({target.chip.hbm_gbps:g} GB/s, {target.chip.bf16_tflops:g} bf16 TFLOP/s), "
          f"context {r['context_len']} tokens; GiB per device:")
    print("| program | weights | KV read | KV written | activations | excess (of weights) | GFLOP | bound | ms | tok/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for x in r["roofline"]:
        print(f"| {x['program']} | {_gib(x['weight_bytes'])} | {_gib(x['kv_read_bytes'])} | {_gib(x['kv_written_bytes'])} | "
              f"{_gib(x['activation_bytes'])} | {_gib(x['excess_bytes'])} ({100 * x['excess_of_weights']:.1f}%) | "
              f"{x['flops'] / 1e9:.1f} | {x['bound']} | {x['predicted_ms']:.3f} | {x['predicted_tokens_per_s']:g} |")
    for name, x in r["decode"].items():
        print(f"{name} (in {x['program']}): predicted {x['predicted_tokens_per_s']:g} tok/s; largest writes: {'; '.join(x['largest_writes'][:2])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.aot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--dump-hlo", type=Path, help="write each compiled program's HLO text into this directory")
    p.add_argument("--cache-dir", type=Path,
                   help="write every compiled program into this JAX persistent compilation cache; a server on the "
                        "target started with FERRUM_JAX_CACHE_DIR pointing at a copy of it looks its programs up "
                        "there (written here; a hit on the real chip is not verified without one)")
    p.add_argument("--context-len", type=int,
                   help="tokens of KV each sequence holds, for the roofline's KV reads (default max-model-len / 2)")
    p.add_argument("--programs", nargs="+", choices=PROGRAM_FAMILIES,
                   help="program families to compile (default: what the server's warmup compiles)")
    args, serve_argv = p.parse_known_args(argv)
    s = parse_settings(serve_argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
        enable_persistent_cache()
    target = get_target(args.target)
    cfg = model_config(s)
    limits = resolve_limits(s, target, cfg)
    devices = target.devices()
    programs = tuple(args.programs or target_programs(s.speculative_method is not None))
    ps = program_set(cfg, limits, devices)
    b = ps.buckets
    print(f"{target.name}: {len(devices)} x {devices[0].device_kind}, {_gib(target.usable_bytes)} GiB usable per device")
    print(f"limits: {vars(limits)}; {sum(num_programs(b, programs))} programs ({', '.join(programs)})\n"
          f"buckets (batch.step_cost: ridge {b.cost.ridge_tokens:.0f} tokens, a logit row {b.cost.row_tokens:.3f} tokens): "
          f"decode {list(b.decode_buckets)}; sequences per token bucket "
          f"{ {t: list(b.step_seq_buckets(t, False)) for t in b.token_buckets} }", flush=True)
    print("| program | compile s | args GiB | out GiB | temp GiB | peak GiB |\n|---|---:|---:|---:|---:|---:|", flush=True)

    def row(c: CompiledProgram):
        print(f"| {c.kind} {c.bucket} | {c.seconds:.1f} | {_gib(c.argument_bytes)} | {_gib(c.output_bytes)} | "
              f"{_gib(c.temp_bytes)} | {_gib(c.peak_bytes)} |", flush=True)  # fmt: skip

    try:
        compiled = compile_all(ps, programs, row)
    except FerrumError:
        raise  # a configuration error, said as such
    except Exception as e:  # XLA / Mosaic / Triton compile failures
        # XLA:TPU refuses a program whose buffers exceed HBM: that is the answer "does not fit".
        fits = "RESOURCE_EXHAUSTED" not in str(e)
        print(f"{'compile failed' if fits else 'DOES NOT FIT'}: {type(e).__name__}: {e}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"target": target.name, "limits": vars(limits), "fits": fits, "error": str(e)}, indent=1))
        return 1
    if args.dump_hlo:
        dump_hlo(compiled, args.dump_hlo)
    r = report(cfg, limits, target, compiled, b, weights_per_device(cfg, limits, devices),
               args.context_len or limits.max_model_len // 2)
    print_roofline(r, target)
    print(
        f"\ncompiled {len(compiled)} programs in {r['compile_s']} s; per device: weights {_gib(r['weight_bytes_per_device'])} GiB, "
        f"KV pool {_gib(r['kv_pool_bytes_per_device'])} GiB ({limits.num_pages} pages), peak {_gib(r['peak_bytes_per_device'])} "
        f"of {_gib(r['usable_bytes_per_device'])} GiB usable: {'fits' if r['fits'] else 'DOES NOT FIT'}; "
        f"up to {r['max_num_pages']} KV pages fit; KV-pool copies in the programs: {r['kv_pool_copies']}\n"
        f"KV pages hold {r['kv_layout']['slots']} layers each, in groups with windows {r['kv_layout']['group_windows']}; "
        f"a {limits.max_model_len}-token sequence holds {r['kv_sequence_ratio']} of "
        f"a full-attention pool's pages for it, the pool holds {r['max_model_len_sequences']} such sequences"
    )
    for line in r["kv_pool_copy_lines"]:
        print("  " + line[:200])
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0 if r["fits"] and r["kv_pool_copies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
