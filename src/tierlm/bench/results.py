"""The benchmark's result document: runs, comparisons, correctness, peers, environment.

It is one JSON-ready dict (`BenchResult.to_dict()`); `validate` checks it against the field list the
issue promises (names may be added, never renamed) and is what the tests assert.

    runs[]:        {config, workload, concurrency, metrics: {ttft_ms, tpot_ms, itl_ms, e2e_ms (each
                   {p50, p90, p99}), requests_per_s, output_tok_per_s, total_tok_per_s,
                   kv_bytes_per_token, kv_bytes_per_session, peak_kv_bytes, peak_rss_bytes,
                   max_sessions_at_budget, cache_hit_rate {tier: rate}, usd_per_million_tokens},
                   correctness: {prompts, exact_match, repeat_anomalies}}
    comparisons[]: {config, baseline, workload, memory_reduction, speedup: {prefill, decode, e2e}}
    environment:   {machine, versions, config_digest, seed}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DIST = ("p50", "p90", "p99")
RUN_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "requests_per_s", "output_tok_per_s", "total_tok_per_s",
               "kv_bytes_per_token", "kv_bytes_per_session", "peak_kv_bytes", "peak_rss_bytes",
               "max_sessions_at_budget", "cache_hit_rate", "usd_per_million_tokens")
TIERS = ("device", "host", "disk", "remote")


@dataclass
class BenchResult:
    command: str = ""
    environment: dict = field(default_factory=dict)
    configs: list[dict] = field(default_factory=list)
    workloads: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    correctness: list[dict] = field(default_factory=list)
    peers: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    incomplete: bool = True  # set False only when every planned step ran
    stopped_during: str | None = None

    def to_dict(self) -> dict:
        return {"incomplete": self.incomplete, "stopped_during": self.stopped_during, "command": self.command,
                "environment": self.environment, "configs": self.configs, "workloads": self.workloads,
                "runs": self.runs, "comparisons": self.comparisons, "correctness": self.correctness,
                "peers": self.peers, "notes": self.notes}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def gate_for(self, config: str) -> dict | None:
        return next((g for g in self.correctness if g["config"] == config), None)


def _need(obj, key: str, where: str, problems: list[str]):
    if not isinstance(obj, dict) or key not in obj:
        problems.append(f"{where}.{key} missing")
        return None
    return obj[key]


def validate(doc: dict) -> list[str]:
    """Every field the issue lists, present with the right kind of value; [] when the document is valid."""
    problems: list[str] = []
    runs = _need(doc, "runs", "$", problems)
    for i, run in enumerate(runs or []):
        w = f"runs[{i}]"
        for key in ("config", "workload", "concurrency"):
            _need(run, key, w, problems)
        m = _need(run, "metrics", w, problems)
        for key in RUN_METRICS:
            v = _need(m, key, f"{w}.metrics", problems)
            if key.endswith("_ms") and v is not None:
                for q in DIST:
                    _need(v, q, f"{w}.metrics.{key}", problems)
            if key == "cache_hit_rate" and v is not None and not isinstance(v, dict):
                problems.append(f"{w}.metrics.cache_hit_rate is not a {{tier: rate}} map")
        c = _need(run, "correctness", w, problems)
        for key in ("prompts", "exact_match", "repeat_anomalies"):
            _need(c, key, f"{w}.correctness", problems)
    comps = _need(doc, "comparisons", "$", problems)
    for i, comp in enumerate(comps or []):
        w = f"comparisons[{i}]"
        for key in ("config", "baseline", "workload", "memory_reduction"):
            _need(comp, key, w, problems)
        s = _need(comp, "speedup", w, problems)
        for key in ("prefill", "decode", "e2e"):
            _need(s, key, f"{w}.speedup", problems)
    env = _need(doc, "environment", "$", problems)
    for key in ("machine", "versions", "config_digest", "seed"):
        _need(env, key, "environment", problems)
    return problems
