"""`python -m ferrum_jax.bench serve`: drives a running OpenAI-compatible server the way
`vllm bench serve` does, and reports TTFT, TPOT, ITL and end-to-end latency percentiles
and throughput.

    python -m ferrum_jax.bench serve --base-url http://127.0.0.1:8000 \\
        --num-prompts 200 --max-concurrency 8 --request-rate inf \\
        --random-input-len 128 --random-output-len 64

Workload (vLLM's "random" dataset): each prompt is `input_len` token ids drawn uniformly
from the ids the server's own tokenizer gives a fixed English text (`/tokenize`, so no
tokenizer is needed here and every id is an ordinary text token), sent as a token-id
prompt to /v1/completions; lengths are drawn uniformly from
`[len * (1 - range_ratio), len * (1 + range_ratio)]`; `--random-prefix-len N` starts every
prompt with the same N ids (a shared system prompt, as vLLM's option of that name). Requests are greedy, streamed with
`stream_options.include_usage`, and ignore eos by default so each one generates exactly
its output length. Works against vLLM too (same routes), for side-by-side runs.

A probe request (the first prompt, 4 tokens) runs before the timed ones, as in vLLM's
benchmark: with a shared prefix, the timed run starts with that prefix cached.

Arrivals: a Poisson process of `--request-rate` requests/s (`inf`: all at once), at most
`--max-concurrency` in flight. Definitions, as in vLLM:

    TTFT  time from sending a request to its first streamed token
    ITL   the gaps between successive streamed chunks (one token each)
    TPOT  per request, (latency - TTFT) / (output tokens - 1)
    E2EL  time from sending a request to its last byte

Throughput is over the wall time of the whole run: requests/s, output tokens/s, and
total (prompt + output) tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time

import httpx
import numpy as np

# The text whose tokens prompts are drawn from; any ordinary prose works.
CORPUS = (
    "The quick brown fox jumps over the lazy dog while the farmer walks to the market. "
    "Serving language models efficiently requires batching many requests together, "
    "scheduling prefill and decode work, and managing the memory of the attention cache. "
    "Researchers measure the time to the first token, the time per output token, and the "
    "throughput of the whole system under a steady stream of arriving requests. "
    "Numbers, like 42 and 3.14, punctuation; quotes \"such as these\" and (parentheses) appear too."
)


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: unlimited)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrival rate, requests/s (default inf)")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1-r)..len*(1+r)")
    p.add_argument("--random-prefix-len", type=int, default=0, help="ids every prompt starts with (a shared prefix)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="generate exactly the output length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    p.add_argument("--result-file", default=None, help="also write the metrics as JSON here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.random_input_len < 1 or args.random_output_len < 1:
        p.error("--num-prompts, --random-input-len and --random-output-len must be >= 1")
    if args.random_prefix_len < 0:
        p.error("--random-prefix-len must be >= 0")
    if not 0 <= args.random_range_ratio < 1:
        p.error("--random-range-ratio must be in [0, 1)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0")
    return args


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


async def _workload(http: httpx.AsyncClient, args) -> tuple[str, list[tuple[list[int], int]]]:
    model = args.model
    if model is None:
        r = await http.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    r = await http.post("/tokenize", json={"model": model, "prompt": CORPUS, "add_special_tokens": False})
    r.raise_for_status()
    pool = np.unique(np.asarray(r.json()["tokens"]))
    rng = np.random.default_rng(args.seed)
    inputs = _lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
    outputs = _lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
    prefix = [int(t) for t in rng.choice(pool, size=args.random_prefix_len)]
    return model, [(prefix + [int(t) for t in rng.choice(pool, size=n)], m) for n, m in zip(inputs, outputs)]


async def _one(http: httpx.AsyncClient, args, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": args.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result(ok=False, prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", args.endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = event["error"].get("message", str(event["error"]))
                    return res
                now = time.perf_counter()
                if event.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    res.output_len = event["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=httpx.Timeout(None, connect=30)) as http:
        model, workload = await _workload(http, args)
        print(f"model {model}: {args.num_prompts} prompts, input ~{args.random_input_len} "
              f"(+ {args.random_prefix_len} shared), output ~{args.random_output_len} tokens")
        probe = await _one(http, args, model, workload[0][0], 4)
        if not probe.ok:
            sys.exit(f"the test request failed: {probe.error}")

        semaphore = asyncio.Semaphore(limit)
        rng = np.random.default_rng(args.seed + 1)

        async def limited(prompt, max_tokens):
            async with semaphore:
                return await _one(http, args, model, prompt, max_tokens)

        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, results, duration)


def summarize(args, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    percentiles = [float(p) for p in args.percentiles.split(",")]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    metrics = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        ms = np.asarray(values, np.float64) * 1000 if values else np.zeros(1)
        metrics[f"mean_{name}_ms"] = float(ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(ms))
        metrics[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            metrics[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return metrics


def report(args, m: dict) -> None:
    def row(label, value, fmt="{}"):
        print(f"{label:<40} {fmt.format(value)}")

    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Maximum request concurrency:", args.max_concurrency)
    row("Request rate (req/s, configured):", args.request_rate)
    row("Benchmark duration (s):", m["duration_s"], "{:.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], "{:.2f}")
    row("Output token throughput (tok/s):", m["output_throughput"], "{:.2f}")
    row("Total token throughput (tok/s):", m["total_token_throughput"], "{:.2f}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"), ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print("{s:{c}^50}".format(s=f" {title} ", c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", m[f"mean_{name}_ms"], "{:.2f}")
        row(f"Median {upper} (ms):", m[f"median_{name}_ms"], "{:.2f}")
        for p in args.percentiles.split(","):
            row(f"P{float(p):g} {upper} (ms):", m[f"p{float(p):g}_{name}_ms"], "{:.2f}")
    print("=" * 50)
    for error in m["errors"]:
        print(f"error: {error}")


def main(argv=None) -> None:
    args = parse_args(argv)
    metrics = asyncio.run(run(args))
    report(args, metrics)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"args": vars(args), **metrics}, f, indent=2)
    if metrics["failed"]:
        sys.exit(1)
