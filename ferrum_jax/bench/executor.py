"""Core executor vs HuggingFace transformers, same weights, same prompts, one process.

    python -m ferrum_jax.bench            # ~125M Llama (768 hidden, 12 layers, GQA 12q/4kv)
    python -m ferrum_jax.bench --quick    # small config, for a smoke run
    python -m ferrum_jax.bench --default-model   # SmolLM2-135M-Instruct (the GGUF), both sides
    python -m ferrum_jax.bench --model gemma3-270m   # a packaged model or GGUF file, both sides
    python -m ferrum_jax.bench --moe      # Qwen3-MoE-shaped: 24 layers of 64 experts, top-8

A random-init Llama is built with transformers (seeded), written with
`save_pretrained`, and loaded by `JaxModelExecutor.from_pretrained`; the torch model
that wrote the files is the HF side of every comparison. With `--default-model` both
sides load the default model's GGUF file instead (transformers through its GGUF loader),
dequantized to float32; with `--model` another GGUF file, or a packaged model by name
(`ferrum_jax.packaged_models`: gemma3-270m).

Method (all timings: wall clock, median over `--repeats` runs, after warmup runs of
the identical shapes, so JAX compilation is excluded):

  prefill      one `--prefill-len` prompt, and `--batch` prompts of `--batch-prefill-len`
               (ferrum: `prefill` / `batch_prefill`; HF: `model(input_ids)` under
               `torch.inference_mode`). tok/s = prompt tokens / time.
  decode       ferrum: per-step time of `decode` (batch 1) or one `batch_decode` over
               `--batch` sequences, feeding back the host argmax, as a serving loop
               would. HF: `generate` greedy, exactly N new tokens (eos disabled); a
               logits processor stamps the clock once per step, and the gaps between
               stamps are HF's per-step times (prefill falls before the first stamp, so
               it is excluded, while generate's own per-step work is included, as the
               host argmax is on the ferrum side). Batch HF uses left-padding over the
               same ragged prompts ferrum decodes. Both sides report the median step.
               tok/s = batch / median step time.
  generate     batch 1 end to end: prompt + `--new-tokens` greedy tokens (ferrum:
               prefill + N-1 decodes; HF: generate(N)).

torch runs with `torch.set_num_threads(os.cpu_count())`, XLA's CPU backend uses all
cores by default, so both sides get the whole machine. HF uses its default (sdpa)
attention and dynamic KV cache. torch and transformers are only needed here and in
the tests (the test extra), so they are imported lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

SEED = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


FULL = Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000)
QUICK = Shape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704, vocab=8000)


@dataclasses.dataclass(frozen=True)
class MoeShape(Shape):
    experts: int
    experts_per_token: int
    expert_intermediate: int


# Qwen3-30B-A3B's routing (128 experts, top-8) scaled to this machine: 1.34e9 parameters, 0.21e9
# of them active per token (float32: 5.4 GB a side).
MOE = MoeShape(hidden=1024, layers=24, heads=16, kv_heads=4, intermediate=1024, vocab=32000, experts=64,
               experts_per_token=8, expert_intermediate=256)
MOE_QUICK = MoeShape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=256, vocab=8000, experts=16,
                     experts_per_token=4, expert_intermediate=128)


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as e:  # torch/transformers are the test extra, not a runtime dep
        sys.exit(f"ferrum_jax.bench needs torch and transformers (the test extra): {e}")
    return torch, transformers


def build_hf_model(shape: Shape, max_seq: int):
    torch, transformers = _import_hf()
    if isinstance(shape, MoeShape):
        config = transformers.Qwen3MoeConfig(
            hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads, intermediate_size=shape.intermediate,
            moe_intermediate_size=shape.expert_intermediate, num_experts=shape.experts,
            num_experts_per_tok=shape.experts_per_token, norm_topk_prob=True, vocab_size=shape.vocab,
            max_position_embeddings=max_seq, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(SEED)
        return transformers.Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    config = transformers.LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max_seq,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def amedian_time(fn: Callable[[], Awaitable[object]], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- ferrum


class FerrumSide:
    def __init__(self, ex, fj):
        self.ex, self.fj = ex, fj

    async def prefill(self, prompts: list[np.ndarray]):
        """Prefill every prompt (one `prefill` or one `batch_prefill`); returns outputs."""
        inputs = [self.fj.PrefillInput(input_ids=p[None]) for p in prompts]
        if len(inputs) == 1:
            out = [await self.ex.prefill(inputs[0])]
        else:
            out = await self.ex.batch_prefill(inputs)
        # Pull logits to host: that is when the computation is known to be finished.
        for o in out:
            np.asarray(o.logits)
        return out

    def release(self, outs) -> None:
        for o in outs:
            self.ex.release_cache(o.kv_cache.cache_id)

    async def prefill_once(self, prompts):
        self.release(await self.prefill(prompts))

    async def decode_steps(self, prompts: list[np.ndarray], steps: int) -> tuple[list[float], list[list[int]]]:
        """Greedy-decode `steps` tokens for all prompts; per-step times and the tokens."""
        outs = await self.prefill(prompts)
        caches = [o.kv_cache for o in outs]
        tokens = [[int(np.argmax(np.asarray(o.last_token_logits())[0]))] for o in outs]
        times = []
        try:
            for _ in range(steps):
                inputs = [
                    self.fj.DecodeInput(input_ids=np.array([[t[-1]]], np.int32), kv_cache=c)
                    for t, c in zip(tokens, caches)
                ]
                t0 = time.perf_counter()
                if len(inputs) == 1:
                    ds = [await self.ex.decode(inputs[0])]
                else:
                    ds = await self.ex.batch_decode(inputs)
                for d, t in zip(ds, tokens):
                    t.append(int(np.argmax(np.asarray(d.logits)[0])))
                times.append(time.perf_counter() - t0)
                caches = [d.kv_cache for d in ds]
        finally:
            for c in caches:
                self.ex.release_cache(c.cache_id)
        return times, tokens


# ----------------------------------------------------------------------------- HF


class HFSide:
    def __init__(self, model):
        self.torch, self.transformers = _import_hf()
        self.model = model
        # generate() would otherwise stop at eos, making "N new tokens" a lie.
        model.generation_config.eos_token_id = None

    def prefill(self, prompts: list[np.ndarray]):
        torch = self.torch
        ids = torch.from_numpy(np.stack(prompts).astype(np.int64))
        with torch.inference_mode():
            return self.model(ids).logits

    def generate(self, prompts: list[np.ndarray], new_tokens: int, step_times: list[float] | None = None):
        """Greedy `generate` of exactly `new_tokens`, prompts left-padded to a batch;
        appends the time between consecutive decode steps to `step_times` if given."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        gen = self.transformers.GenerationConfig(
            do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
        )
        stamps: list[float] = []

        def stamp(input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

        with torch.inference_mode():
            out = self.model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                generation_config=gen,
                logits_processor=self.transformers.LogitsProcessorList([stamp]),
            )
        if step_times is not None:
            step_times.extend(np.diff(stamps).tolist())
        assert out.shape[1] == width + new_tokens
        return out[:, width:].numpy()


# ----------------------------------------------------------------------------- main


def machine_info(torch, transformers, load_at_start: tuple[float, ...]) -> list[tuple[str, str]]:
    import jax

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        ("cpu", f"{cpu}, os.cpu_count()={os.cpu_count()}"),
        ("python", platform.python_version()),
        ("jax", f"{jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})"),
        ("torch", f"{torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}"),
        ("transformers", transformers.__version__),
        ("load average at start (1/5/15 min)", " ".join(f"{x:.2f}" for x in load_at_start)),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and shapes (smoke run)")
    p.add_argument("--default-model", action="store_true", help="SmolLM2-135M-Instruct (GGUF) instead of a random Llama")
    p.add_argument("--model", help="a packaged model's name (gemma3-270m) or a GGUF file, instead of a random Llama")
    p.add_argument("--moe", action="store_true", help="a random Qwen3-MoE-shaped model instead of a random Llama")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per decode measurement")
    p.add_argument("--prefill-len", type=int, default=None, help="single-prompt prefill length")
    p.add_argument("--batch", type=int, default=8, help="batch size for batched prefill/decode")
    p.add_argument("--batch-prefill-len", type=int, default=None, help="per-prompt length in the batched prefill")
    p.add_argument("--decode-prompt-len", type=int, default=None, help="longest prompt before decoding")
    p.add_argument(
        "--max-seq",
        type=int,
        default=None,
        help="executor max_sequence_length (default: the smallest that fits every measurement)",
    )
    args = p.parse_args(argv)
    defaults = dict(repeats=3, new_tokens=16, prefill_len=128, batch_prefill_len=32, decode_prompt_len=32) if args.quick else dict(
        repeats=5, new_tokens=32, prefill_len=512, batch_prefill_len=128, decode_prompt_len=128
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode steps are timed between tokens)")
    return args


async def run(args) -> None:
    # Other processes on the box skew every figure (torch's OpenMP barriers stall
    # badly when a core is taken), so the load average is reported with the results.
    load_at_start = os.getloadavg()
    torch, transformers = _import_hf()
    import ferrum_jax as fj

    torch.set_num_threads(os.cpu_count())
    shape = (MOE_QUICK if args.quick else MOE) if args.moe else (QUICK if args.quick else FULL)
    needed = max(args.prefill_len, args.batch_prefill_len, args.decode_prompt_len + args.new_tokens)
    max_seq = args.max_seq or needed
    if max_seq < needed:
        sys.exit(f"--max-seq {max_seq} is below the {needed} tokens the measurements need")
    rng = np.random.default_rng(SEED)

    if args.default_model or args.model:
        from ferrum_jax.packaged_models import PACKAGED

        name = args.model or "smollm2-135m"
        path = PACKAGED[name]() if name in PACKAGED else Path(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        vocab, source = model.config.vocab_size, path
    else:
        model = build_hf_model(shape, max_seq)
        vocab, source = shape.vocab, None

    def prompts(n: int, length: int) -> list[np.ndarray]:
        return [rng.integers(3, vocab, size=length, dtype=np.int32) for _ in range(n)]

    long_prompt = prompts(1, args.prefill_len)
    batch_prompts = prompts(args.batch, args.batch_prefill_len)
    decode_prompt = prompts(1, args.decode_prompt_len)
    # Ragged lengths make HF's left-padding (and ferrum's ragged batching) do real work.
    lengths = np.linspace(args.decode_prompt_len // 2, args.decode_prompt_len, args.batch).astype(int)
    decode_batch = [rng.integers(3, vocab, size=int(n), dtype=np.int32) for n in lengths]

    hf = HFSide(model)
    with tempfile.TemporaryDirectory() as d:
        if source is None:
            model.save_pretrained(d, safe_serialization=True)
        t = time.perf_counter()
        ex = fj.JaxModelExecutor.from_pretrained(
            source or d, dtype="float32", page_size=16, max_batch_size=args.batch, max_sequence_length=max_seq
        )
        load_s = time.perf_counter() - t
    ferrum = FerrumSide(ex, fj)

    what = f"{source.name} (GGUF)" if source else f"{'Qwen3-MoE' if args.moe else 'Llama'} {shape}"
    print(f"model: {what}, {n_params(model) / 1e6:.1f}M params, float32; ferrum load {load_s:.1f}s")
    for k, v in machine_info(torch, transformers, load_at_start):
        print(f"{k}: {v}")

    # Correctness guard: a fast wrong answer is not a result. (Random weights give
    # near-uniform logits, so this checks logits, not greedy tokens.)
    outs = await ferrum.prefill(long_prompt)
    ours = np.asarray(outs[0].logits)
    ferrum.release(outs)
    ref = hf.prefill(long_prompt).numpy()
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"prefill logits rel err vs HF (max|a-b|/max|b|): {rel:.2e}")
    print(f"ferrum: max_sequence_length={max_seq}, attention={ex.attention_impl}, page_size=16")

    rows: list[tuple[str, float, float, str, str]] = []  # name, ferrum, HF, better, format
    r, w = args.repeats, 2

    t_f = await amedian_time(lambda: ferrum.prefill_once(long_prompt), r, w)
    t_h = median_time(lambda: hf.prefill(long_prompt), r, w)
    rows.append((f"prefill 1x{args.prefill_len} (tok/s)", args.prefill_len / t_f, args.prefill_len / t_h, "higher", ",.0f"))

    n_tok = args.batch * args.batch_prefill_len
    t_f = await amedian_time(lambda: ferrum.prefill_once(batch_prompts), r, w)
    t_h = median_time(lambda: hf.prefill(batch_prompts), r, w)
    rows.append((f"prefill {args.batch}x{args.batch_prefill_len} (tok/s)", n_tok / t_f, n_tok / t_h, "higher", ",.0f"))

    n = args.new_tokens
    for label, ps in ((f"decode b=1, ctx {args.decode_prompt_len}+", decode_prompt), (f"decode b={args.batch}, ctx {lengths[0]}-{lengths[-1]}+", decode_batch)):
        await ferrum.decode_steps(ps, 3)  # warmup: compiles the decode shapes
        step_times = []
        for _ in range(r):
            times, _tokens = await ferrum.decode_steps(ps, n - 1)
            step_times.extend(times)
        t_f = statistics.median(step_times)
        hf.generate(ps, 3)  # warmup
        hf_steps: list[float] = []
        for _ in range(r):
            hf.generate(ps, n, hf_steps)
        t_h = statistics.median(hf_steps)
        rows.append((f"{label} (tok/s)", len(ps) / t_f, len(ps) / t_h, "higher", ",.1f"))

    async def ferrum_generate():
        await ferrum.decode_steps(decode_prompt, n - 1)

    t_f = await amedian_time(ferrum_generate, r, 1)
    t_h = median_time(lambda: hf.generate(decode_prompt, n), r, 1)
    rows.append((f"generate b=1, {args.decode_prompt_len}+{n} tok (s)", t_f, t_h, "lower", ".3f"))

    load_at_end = os.getloadavg()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_at_end)}")
    if max(load_at_start[0], load_at_end[0]) > 1.5 * (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work; these figures are not comparable")
    print()
    print("| measurement | ferrum_jax | HF transformers | ferrum/HF |")
    print("|---|---:|---:|---:|")
    for name, f, h, better, fmt in rows:
        print(f"| {name} | {f:{fmt}} | {h:{fmt}} | {f / h:.2f}x ({better} is better) |")


def main(argv=None) -> None:
    asyncio.run(run(parse_args(argv)))
