"""ServerMetrics: Prometheus metrics of one server, in its own registry (several apps per process in tests).

Request-level metrics (counts by endpoint and status, TTFT / TPOT / E2E histograms, policy use) are
recorded by the app as requests go. Engine-level ones are read at scrape time from the engine's own
counters and the loop thread's snapshots (plain ints and floats, safe to read from any thread).

KV tier metrics (label `tier`: host, disk, redis; only configured tiers appear) are read at scrape time
from `LLMEngine.tier_stats()` and the tier controller's counters: traffic (lookups and found in blocks,
hit tokens, bytes loaded and stored), evictions, corrupt entries, errors, capacity, use, health, the
load latency histogram, recompute fallbacks by reason and preemptions by offload.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tierlm.engine.async_engine import AsyncEngine
from tierlm.kvcache.tiers.base import LATENCY_BUCKETS

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin/drift/rearm")


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
        yield counter("tierlm_preemptions", "sequences preempted (recompute or offload)", eng.scheduler.num_preemptions)
        yield counter("tierlm_preemptions_offloaded", "preemptions whose KV was offloaded to the host tier",
                      getattr(eng.scheduler, "num_offloads", 0))
        yield counter("tierlm_engine_step_errors", "engine steps that raised", a.num_step_errors)
        yield counter("tierlm_summary_cache_hits", "prompt summaries served from the cache", self.summarizer.hits)
        yield counter("tierlm_summary_cache_misses", "prompt summaries generated", self.summarizer.misses)
        guard = getattr(eng, "drift_guard", None)
        if guard is not None:
            st = guard.status()
            yield gauge("tierlm_drift_guard_tripped", "1 while the drift guard has switched new requests to the "
                        "safe KV format (until re-armed)", float(st["tripped"]))
            yield gauge("tierlm_drift_guard_safe_format_active", "1 while the KV pool runs the safe format",
                        float(eng.kv_format != eng.candidate_kv_format))
            w = st["window"]
            yield gauge("tierlm_drift_window_kl_mean", "mean KL(reference || served) per token over the "
                        "guard's window (top-k buckets)", w["kl_mean"] if w["kl_mean"] is not None else float("nan"))
            yield gauge("tierlm_drift_window_top1_agreement", "top-1 agreement with the reference over the "
                        "guard's window", w["top1_agreement"] if w["top1_agreement"] is not None else float("nan"))
            yield gauge("tierlm_drift_window_tokens", "scored tokens in the guard's window", w["tokens"])
            yield counter("tierlm_drift_scored_tokens", "output tokens shadow-scored against the reference",
                          st["scored_tokens"])
            yield counter("tierlm_drift_scored_requests", "requests shadow-scored", st["scored_requests"])
            yield counter("tierlm_drift_dropped_requests", "chosen requests not scored (queue full or too long)",
                          st["dropped_queue_full"] + st["skipped_too_long"])
            yield counter("tierlm_drift_guard_trips", "times the drift guard tripped", st["trips"])


# name, help, key in one tier's stats dict: per-tier counters, then gauges
_TIER_COUNTERS = (
    ("tierlm_tier_hit_tokens", "prompt tokens whose KV was loaded from the tier", "hit_tokens"),
    ("tierlm_tier_lookups", "blocks looked up in the tier", "lookups"),
    ("tierlm_tier_found", "blocks looked up and found in the tier", "found"),
    ("tierlm_tier_loads", "entries loaded from the tier", "loads"),
    ("tierlm_tier_loaded_bytes", "bytes loaded from the tier", "bytes_loaded"),
    ("tierlm_tier_stores", "entries written to the tier", "stores"),
    ("tierlm_tier_stored_bytes", "bytes written to the tier", "bytes_stored"),
    ("tierlm_tier_evictions", "entries the tier evicted to make room", "evictions"),
    ("tierlm_tier_rejected", "stores the tier refused (too large, all pinned, backend failing)", "rejected"),
    ("tierlm_tier_corrupt_entries", "entries found corrupt or foreign (deleted, recomputed)", "corrupt"),
    ("tierlm_tier_errors", "backend failures (I/O error, timeout, connection refused)", "errors"),
    ("tierlm_tier_reconnects", "times the tier became healthy again after a failure", "reconnects"),
)
_TIER_GAUGES = (
    ("tierlm_tier_capacity_bytes", "bytes the tier may hold", "capacity_bytes"),
    ("tierlm_tier_used_bytes", "bytes the tier holds", "used_bytes"),
    ("tierlm_tier_entries", "entries (blocks) the tier holds", "entries"),
    ("tierlm_tier_healthy", "1 when the tier answers, 0 while it is down (backing off)", "healthy"),
    ("tierlm_tier_bandwidth_bytes_per_second", "measured load bandwidth (the cost model's estimate)",
     "bandwidth_bytes_per_s"),
)
_FALLBACKS = (("cost", "fallback_cost"), ("timeout", "fallback_timeout"), ("corrupt", "fallback_corrupt"))


class _TierCollector:
    """KV tier metrics, read at scrape time. tier_stats() builds fresh dicts from plain counters the loader,
    writer and engine threads update; a scrape may see one counter a step ahead of another, never a torn value."""

    def __init__(self, aengine: AsyncEngine):
        self.engine = aengine.engine

    def collect(self):
        eng = self.engine
        controller = getattr(eng, "tiers", None)
        stats = eng.tier_stats() if controller is not None else {}
        for name, doc, key in _TIER_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["tier"])
            for tier, t in stats.items():
                c.add_metric([tier], t.get(key, 0))
            yield c
        for name, doc, key in _TIER_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["tier"])
            for tier, t in stats.items():
                g.add_metric([tier], float(t.get(key, 0)))
            yield g
        h = HistogramMetricFamily("tierlm_tier_load_seconds", "time of one batched load call to the tier",
                                  labels=["tier"])
        for tier, t in stats.items():
            counts = list(t.get("load_latency") or [0] * (len(LATENCY_BUCKETS) + 1))
            buckets, total = [], 0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts):
                total += n
                buckets.append((bound, total))
            h.add_metric([tier], buckets, t.get("load_seconds_sum", 0.0))
        yield h
        cs = controller.stats if controller is not None else None
        f = CounterMetricFamily("tierlm_tier_fallback_tokens",
                                "prompt tokens found in a tier but recomputed, by reason (cost model, load "
                                "timeout, corrupt entry or failing tier)", labels=["reason"])
        if cs is not None:
            for reason, attr in _FALLBACKS:
                f.add_metric([reason], getattr(cs, attr))
        yield f
        for name, doc, attr in (
                ("tierlm_tier_miss_tokens", "prompt tokens looked up below the device and found in no tier",
                 "miss_tokens"),
                ("tierlm_tier_demoted_blocks", "blocks stored in a tier as the device pool evicted them",
                 "demoted_blocks"),
                ("tierlm_tier_offloaded_blocks", "blocks of preempted sequences offloaded to the host tier",
                 "offloaded_blocks"),
                ("tierlm_tier_dropped_writes", "tier writes dropped because the writer queue was full",
                 "dropped_writes"),
                ("tierlm_tier_load_jobs", "loads from the tiers started", "load_jobs")):
            c = CounterMetricFamily(name, doc)
            if cs is not None:
                c.add_metric([], getattr(cs, attr))
            yield c


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
        r.register(_TierCollector(aengine))

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
