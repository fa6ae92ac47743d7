"""Prometheus metrics at `/metrics`, named like vLLM's with a `ferrum:` prefix.

Engine-side numbers (running/waiting requests, KV usage, preemptions, token totals, the
prefix cache's token counters and page count) are
read from `engine.stats()` at scrape time by a custom collector, so they are exact and
cost nothing between scrapes. With speculative decoding on, the collector adds vLLM's
`spec_decode_*` counters (drafts verified, draft tokens, accepted tokens) and the mean
acceptance length (tokens emitted per verify); without it they are absent, as in vLLM. Latencies are only visible here, per request, and are
observed into histograms by `RequestTimer` as the server streams tokens out.

Each server owns its registry (not prometheus_client's global one), so building two apps
in one process does not collide.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's bucket edges, so dashboards built for vLLM read these unchanged.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self._engine = engine
        self._labels = {"model_name": model_name}

    def _family(self, cls, name: str, doc: str, value: float):
        family = cls(name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), value)
        return family

    def collect(self):
        s = self._engine.stats()
        yield self._family(GaugeMetricFamily, "ferrum:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._family(GaugeMetricFamily, "ferrum:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._family(GaugeMetricFamily, "ferrum:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).", s.kv_cache_usage)
        yield self._family(CounterMetricFamily, "ferrum:num_preemptions", "Requests preempted for lack of KV pages.", s.num_preemptions)
        yield self._family(CounterMetricFamily, "ferrum:prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens)
        yield self._family(CounterMetricFamily, "ferrum:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._family(
            CounterMetricFamily, "ferrum:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield self._family(
            CounterMetricFamily, "ferrum:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits
        )
        yield self._family(
            GaugeMetricFamily, "ferrum:prefix_cache_pages", "KV pages holding a cached prefix (in use or reusable).", s.prefix_cache_pages
        )
        if self._engine.drafter is None:
            return
        yield self._family(CounterMetricFamily, "ferrum:spec_decode_num_drafts", "Verify steps of a request with drafts.", s.spec_verify_steps)
        yield self._family(CounterMetricFamily, "ferrum:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", s.spec_draft_tokens)
        yield self._family(CounterMetricFamily, "ferrum:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_accepted_tokens)
        yield self._family(
            GaugeMetricFamily,
            "ferrum:spec_decode_mean_acceptance_length",
            "Tokens emitted per verify step (accepted drafts + 1), since start; 0 before the first.",
            s.mean_acceptance_length,
        )


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(
            "ferrum:time_to_first_token_seconds", "Time from arrival to the first output token.", labels, buckets=_TTFT_BUCKETS, registry=self.registry
        ).labels(model_name)
        self.itl = Histogram(
            "ferrum:inter_token_latency_seconds", "Time between successive output tokens.", labels, buckets=_ITL_BUCKETS, registry=self.registry
        ).labels(model_name)
        self.e2e = Histogram(
            "ferrum:e2e_request_latency_seconds", "Time from arrival to the last output token.", labels, buckets=_E2E_BUCKETS, registry=self.registry
        ).labels(model_name)
        self._success = Counter(
            "ferrum:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"], registry=self.registry
        )

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request (one choice)."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._m = metrics
        self._arrival = arrival
        self._last: float | None = None

    def tokens(self, n: int) -> None:
        """Called when a delta of `n` new tokens arrives. A later delta carrying several
        tokens counts its gap once per token, split evenly (what each token waited on
        average); tokens that arrive together with the first one count toward TTFT only."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.observe(now - self._arrival)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last = now

    def done(self, reason: str) -> None:
        self._m.e2e.observe(time.perf_counter() - self._arrival)
        self._m.finished(reason)
