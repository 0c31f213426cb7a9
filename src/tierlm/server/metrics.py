"""ServerMetrics: Prometheus metrics of one server, in its own registry (several apps per process in tests).

Request-level metrics (counts by endpoint and status, TTFT / TPOT / E2E histograms, policy use) are
recorded by the app as requests go. Engine-level ones are read at scrape time from the engine's own
counters and the loop thread's snapshots (plain ints and floats, safe to read from any thread).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tierlm.engine.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _EngineCollector:
    def __init__(self, aengine: AsyncEngine, queue_length, summarizer):
        self.aengine = aengine
        self.queue_length = queue_length
        self.summarizer = summarizer

    def collect(self):
        a, eng = self.aengine, self.aengine.engine
        stats = eng.kv.stats

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("tierlm_queue_length", "sequences accepted but not yet running", self.queue_length())
        yield gauge("tierlm_num_requests_running", "sequences running in the engine", a.num_running)
        yield gauge("tierlm_num_requests_waiting", "sequences waiting in the engine scheduler", a.num_waiting)
        yield gauge("tierlm_kv_cache_usage_ratio", "fraction of KV blocks referenced by requests", eng.kv.usage)
        yield gauge("tierlm_kv_cache_free_blocks", "KV blocks not referenced by any request", eng.kv.num_free_blocks)
        yield counter("tierlm_prompt_tokens", "prompt tokens added to the engine", eng.counters["prompt_tokens"])
        yield counter("tierlm_generation_tokens", "tokens generated", eng.counters["generation_tokens"])
        yield counter("tierlm_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                      stats.prefix_cache_queries)
        yield counter("tierlm_prefix_cache_hits", "prompt tokens found in the prefix cache", stats.prefix_cache_hits)
        yield counter("tierlm_kv_cache_evictions", "cached KV blocks evicted", stats.evictions)
        yield counter("tierlm_preemptions", "sequences preempted (recompute)", eng.scheduler.num_preemptions)
        yield counter("tierlm_engine_step_errors", "engine steps that raised", a.num_step_errors)
        yield counter("tierlm_summary_cache_hits", "prompt summaries served from the cache", self.summarizer.hits)
        yield counter("tierlm_summary_cache_misses", "prompt summaries generated", self.summarizer.misses)


class ServerMetrics:
    def __init__(self, aengine: AsyncEngine, queue_length, summarizer):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tierlm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("tierlm_requests_rejected", "requests refused before the engine, by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("tierlm_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("tierlm_time_per_output_token_seconds", "time per output token after the first",
                              registry=r, buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("tierlm_e2e_request_latency_seconds", "end-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.request_prompt_tokens = Counter("tierlm_request_prompt_tokens", "prompt tokens of served requests",
                                             registry=r)
        self.request_generation_tokens = Counter("tierlm_request_generation_tokens",
                                                 "tokens generated for served requests", registry=r)
        self.prompt_policy = Counter("tierlm_prompt_policy_applied", "prompts changed by a prompt policy",
                                     ["policy"], registry=r)
        r.register(_EngineCollector(aengine, queue_length, summarizer))

    def observe_status(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def observe_request(self, ttft: float | None, e2e: float, num_prompt: int, num_out: int, seq_len: int) -> None:
        """num_out: tokens over all n sequences; seq_len: the longest sequence's tokens (TPOT's divisor)."""
        self.e2e.observe(e2e)
        self.request_prompt_tokens.inc(num_prompt)
        self.request_generation_tokens.inc(num_out)
        if ttft is not None:
            self.ttft.observe(ttft)
            if seq_len > 1:
                self.tpot.observe((e2e - ttft) / (seq_len - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
