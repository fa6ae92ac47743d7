"""Load against a live server: 32 concurrent streams of random lengths, through a KV pool
too small to hold them (so they complete through preemption) with outputs identical to
the executor's greedy decode; aborted and disconnected requests free their pages; a full
waiting queue answers 503; /metrics parses and moves; the serving benchmark runs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from serve_fixtures import MODEL, REPO, random_prompt, reference_greedy, shared_server


@pytest.fixture(scope="session")
def server():
    return shared_server()


async def _stream_tokens(client, prompt: list[int], max_tokens: int) -> tuple[list[int], str | None, int]:
    """(token ids, finish_reason, usage.completion_tokens) of one greedy streamed completion."""
    tokens, finish, usage = [], None, None
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            tokens += choice.token_ids or []
            finish = choice.finish_reason or finish
    return tokens, finish, usage


def test_32_concurrent_streams_complete_through_preemption(server):
    rng = np.random.default_rng(1)
    lengths = [(int(rng.integers(1, 120)), int(rng.integers(1, 120))) for _ in range(32)]
    prompts = [random_prompt(rng, n) for n, _ in lengths]
    before = server.metrics()

    async def run():
        client = server.async_client()
        return await asyncio.gather(*(_stream_tokens(client, p, m) for p, (_, m) in zip(prompts, lengths)))

    results = asyncio.run(run())
    for (tokens, finish, usage), (_, max_tokens) in zip(results, lengths):
        assert len(tokens) == usage == max_tokens and finish == "length"
    after = server.wait_idle()
    assert after["ferrum:num_preemptions_total"] > before["ferrum:num_preemptions_total"], "the small KV pool never preempted"
    assert after["ferrum:kv_cache_usage_perc"] == 0
    for p, (tokens, _, _), (_, max_tokens) in zip(prompts, results, lengths):
        assert tokens == reference_greedy(p, max_tokens), f"prompt of {len(p)} tokens"


def test_disconnected_and_aborted_requests_free_their_pages(server):
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 200, "ignore_eos": True}
    before = server.metrics()

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            # Streams closed after their first tokens.
            for _ in range(6):
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            break
            async def running(n: int) -> bool:
                return f'ferrum:num_requests_running{{model_name="{MODEL}"}} {n}.0' in (await http.get("/metrics")).text

            # A non-streaming request whose client gives up once it is running.
            while not await running(0):
                await asyncio.sleep(0.01)
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            while not request.done() and not await running(1):
                await asyncio.sleep(0.01)
            assert not request.done(), "the request finished before it could be abandoned"
            request.cancel()

    asyncio.run(run())
    after = server.wait_idle()
    assert after["ferrum:kv_cache_usage_perc"] == 0
    assert after["ferrum:num_requests_running"] == 0 and after["ferrum:num_requests_waiting"] == 0
    assert after["ferrum:request_success_total{abort}"] - before.get("ferrum:request_success_total{abort}", 0) == 7
    # Aborted early: far fewer tokens than the 7 x 200 the requests asked for.
    assert after["ferrum:generation_tokens_total"] - before["ferrum:generation_tokens_total"] < 7 * 200 / 2


def test_full_queue_answers_503_and_recovers(server):
    body = {"model": MODEL, "prompt": "queue", "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=httpx.Limits(max_connections=100)) as http:

            everyone_answered = asyncio.Event()
            answered = 0

            async def one():
                nonlocal answered
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    answered += 1
                    if answered == 60:
                        everyone_answered.set()
                    if r.status_code != 200:
                        await r.aread()
                        return r.status_code, r.json()
                    # Hold the stream until every request got its answer, so no abort
                    # makes room in the queue; leaving the block then aborts it.
                    await everyone_answered.wait()
                    return 200, None

            return await asyncio.gather(*(one() for _ in range(60)))

    results = asyncio.run(run())
    refused = [err for status, err in results if status == 503]
    assert refused, "60 simultaneous requests never filled the queue of 32"
    assert all(status in (200, 503) for status, _ in results)
    assert refused[0]["error"]["type"] == "server_error" and "max_waiting" in refused[0]["error"]["message"]
    server.wait_idle()
    r = server.client().completions.create(model=MODEL, prompt="after", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_metrics_parse_and_move(server):
    server.wait_idle()
    before = server.metrics()
    for name in (
        "ferrum:num_requests_running",
        "ferrum:num_requests_waiting",
        "ferrum:kv_cache_usage_perc",
        "ferrum:num_preemptions_total",
        "ferrum:prompt_tokens_total",
        "ferrum:generation_tokens_total",
        "ferrum:time_to_first_token_seconds_count",
        "ferrum:inter_token_latency_seconds_count",
        "ferrum:e2e_request_latency_seconds_count",
    ):
        assert name in before, name
    r = server.client().completions.create(model=MODEL, prompt="count me", max_tokens=9, extra_body={"ignore_eos": True})
    after = server.metrics()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["ferrum:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["ferrum:generation_tokens_total"] == 9
    assert delta["ferrum:time_to_first_token_seconds_count"] == 1
    assert delta["ferrum:inter_token_latency_seconds_count"] == 8
    assert delta["ferrum:e2e_request_latency_seconds_count"] == 1
    assert delta["ferrum:request_success_total{length}"] == 1
    assert delta["ferrum:e2e_request_latency_seconds_sum"] > 0


def test_serving_benchmark_runs(server):
    cmd = [
        sys.executable, "-m", "ferrum_jax.bench", "serve",
        "--base-url", server.base_url,
        "--num-prompts", "12",
        "--max-concurrency", "4",
        "--request-rate", "50",
        "--random-input-len", "16",
        "--random-output-len", "8",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    for needle in ("Successful requests:", "Request throughput (req/s):", "Output token throughput (tok/s):", "TTFT", "TPOT", "ITL"):
        assert needle in out.stdout, needle
    assert re.search(r"Successful requests:\s+12\n", out.stdout)
    assert re.search(r"Total generated tokens:\s+96\n", out.stdout)
