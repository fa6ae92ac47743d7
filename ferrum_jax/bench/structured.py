"""The cost of constrained decoding: `python -m ferrum_jax.bench structured`.

On the default model (SmolLM2-135M-Instruct, float32) in process, through the engine:
  throughput  a batch of `--batch` json_schema requests against the same batch unconstrained,
              the same chat prompts, greedy, `--output-len` tokens each (the schema, an array of
              at least 8 person objects, is too long to finish first, so both batches produce
              the same number of tokens); the runs alternate, `--repeats` each, medians;
  masks       host time to fill the batch's packed bitmask (llguidance, all rows in parallel)
              with every matcher part-way through a reply, median of 200;
  compile     the time to build llguidance's view of the tokenizer (once per server), and to
              compile a typical schema cold and from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "role"],
    "additionalProperties": False,
}
PEOPLE = {"type": "array", "items": PERSON, "minItems": 8}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench structured", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import ferrum_jax as fj
    from ferrum_jax.engine import Engine, EngineConfig, SamplingParams
    from ferrum_jax.serve.structured_outputs import grammar_tokenizer
    from ferrum_jax.serve.tokenizer import load_tokenizer
    from ferrum_jax.structured.compiler import GrammarCompiler, GrammarSpec
    from ferrum_jax.structured.matcher import fill_bitmasks

    path = fj.default_model_path()
    ex = fj.JaxModelExecutor.from_pretrained(
        path, dtype="float32", max_batch_size=args.batch, max_sequence_length=256, max_num_batched_tokens=512,
    )
    tok = load_tokenizer(path)
    t0 = time.perf_counter()
    llt = grammar_tokenizer(tok, ex.cfg.vocab_size)
    tokenizer_s = time.perf_counter() - t0
    compiler = GrammarCompiler(llt)
    spec = GrammarSpec("json", json.dumps(PEOPLE), "bench")
    t0 = time.perf_counter()
    compiler.compile(spec)
    cold_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    compiler.compile(spec)
    cached_ms = (time.perf_counter() - t0) * 1e3

    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": f"List 8 people of team {i} as JSON."}], add_generation_prompt=True), add_special_tokens=False)
        for i in range(args.batch)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    async def run(constrained: bool) -> tuple[float, int]:
        engine = Engine(ex, EngineConfig())
        await engine.start()
        try:
            t0 = time.perf_counter()
            streams = [
                engine.add_request(f"r{i}", p, params, grammar=compiler.compile(spec) if constrained else None)
                for i, p in enumerate(prompts)
            ]
            tokens = 0
            for s in streams:
                async for out in s:
                    tokens += len(out.new_token_ids)
            return time.perf_counter() - t0, tokens
        finally:
            await engine.stop()

    asyncio.run(run(False))  # compiles every program both runs use
    asyncio.run(run(True))
    plain, constrained = [], []
    for _ in range(args.repeats):
        for out, flag in ((plain, False), (constrained, True)):
            seconds, tokens = asyncio.run(run(flag))
            out.append(tokens / seconds)

    # Matchers part-way through a reply: the greedy tokens of a constrained run, replayed.
    matchers = [compiler.compile(spec) for _ in range(args.batch)]
    partial = tok.encode(json.dumps([{"name": "Ann", "age": 31, "email": "ann@x.com", "role": "user"}] * 2)[:-1] + ", {\"na", add_special_tokens=False)
    for m in matchers:
        for t in partial:
            assert m.accept(t), tok.decode([t])
    rows = [(m, r) for r, m in enumerate(matchers)]
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        fill_bitmasks(rows, args.batch, ex.cfg.vocab_size)
        times.append(time.perf_counter() - t0)

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f}; model {path.name}, float32")
    print(f"| batch of {args.batch}, {args.output_len} tokens each | output tok/s (median of {args.repeats}) | runs |")
    print("|---|---:|---|")
    print(f"| unconstrained | {statistics.median(plain):.1f} | {', '.join(f'{x:.1f}' for x in plain)} |")
    print(f"| json_schema (array of >= 8 person objects) | {statistics.median(constrained):.1f} | {', '.join(f'{x:.1f}' for x in constrained)} |")
    print(f"constrained / unconstrained throughput: {statistics.median(constrained) / statistics.median(plain):.3f}x")
    print(f"bitmask fill for {args.batch} rows (vocab {ex.cfg.vocab_size}): median {statistics.median(times) * 1e3:.3f} ms, p90 {sorted(times)[179] * 1e3:.3f} ms")
    print(f"grammar tokenizer build: {tokenizer_s:.2f} s (once per server); schema compile: cold {cold_ms:.2f} ms, cached {cached_ms:.3f} ms")
