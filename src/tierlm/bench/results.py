"""The benchmark's results as typed dataclasses; `BenchResult.to_dict()` is the JSON document.

    BenchResult
      environment: Environment (machine, versions, plan, digest, seed, load averages, stage times)
      configs:     [ConfigInfo]           what each configuration is, its KV format and pool
      workloads:   [WorkloadInfo]         shapes, with the shared prefix measured from the token ids
      gates:       [ConfigGate]           the correctness gate per configuration (gate.py)
      runs:        [RunResult]            one per config x workload x arrival plan (reps pooled)
      comparisons: [Comparison]           each run against its reference run (comparison.py)
      peers:       PeerResults            transformers phase speeds side by side (phases.PhaseRow)

Every figure's definition is in the module that measures it (metrics.py, engine_driver.StepStats,
memory.py, comparison.py) and in the report's Definitions section. Adding a field is free; renaming one
breaks readers of old JSON, so don't.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from tierlm.bench.engine_driver import StepStats, TierTraffic
from tierlm.bench.gate import ConfigGate
from tierlm.bench.metrics import RunMetrics, Spread

TIERS = ("device", "host", "disk", "redis")  # where cached prompt tokens come from, as the engine names them


@dataclass
class ConfigInfo:
    name: str
    summary: str
    kv_format: str
    dtype: str
    attention_backend: str
    prefix_caching: bool
    chunked_prefill: bool
    max_num_batched_tokens: int
    kv_bytes_per_token: int
    kv_pool_bytes: int
    weights_bytes: int
    weights_read_per_step: int
    load_s: float
    tolerance: int
    lower_tiers: dict[str, int] = field(default_factory=dict)  # KV tier below the device -> its capacity in bytes


@dataclass
class WorkloadInfo:
    name: str
    spec: str
    shape: str
    requests: int
    max_seq_len: int
    shared_prefix_tokens: int


@dataclass
class MemoryFigures:
    """KV, activations and weights apart, plus the whole process (see the report's Definitions)."""

    kv_bytes_per_token: int | None = None
    kv_bytes_per_session: float | None = None  # KV referenced / running sessions, at the run's peak
    peak_kv_bytes: int | None = None  # KV blocks referenced at the run's peak x bytes per block
    kv_pool_bytes: int | None = None  # allocated for the device pool
    max_sessions_at_budget: int | None = None  # KVSpec.max_sessions(budget, longest session, shared prefix)
    memory_budget_bytes: int | None = None
    weights_bytes: int | None = None
    activations_peak_bytes: int | None = None  # torch allocations during the run's largest step
    peak_rss_bytes: int | None = None
    peak_rss_scope: str | None = None  # "run" (reset before the run) or "process" (lifetime)
    peak_device_bytes: int | None = None


@dataclass
class RunCheck:
    """A greedy run's own output tokens against the reference configuration's for the same requests."""

    reference: str
    requests: int
    exact_match: int
    first_divergence: int | None
    diverged_requests: list[int]
    tolerance: int
    flagged: bool
    reason: str


@dataclass
class RepFigures:
    """The figures of one repetition (for ratio spreads across paired repetitions)."""

    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    e2e_p50_ms: float | None
    output_tok_per_s: float | None
    decode_tok_per_s: float | None  # decode-only steps (in-process) or wall decode (HTTP)


@dataclass
class RunResult:
    config: str
    driver: str  # "in-process" | "http"
    workload: str
    workload_spec: str
    shape: str
    concurrency: int | None
    rate: float | None
    burstiness: float
    arrival: str
    timed: bool
    reps: int
    incomplete: bool
    metrics: RunMetrics
    per_rep: list[RepFigures]
    spread: dict[str, Spread]
    memory: MemoryFigures
    cache_hit_rate: dict[str, float | None]  # tier -> cached prompt tokens from it / prompt tokens; None: no such tier
    steps: StepStats | None = None  # in-process runs
    tiers: TierTraffic | None = None  # in-process runs of a config with lower KV tiers: their traffic, fallbacks, loads
    evictions: int | None = None
    preemptions: int | None = None
    achieved_gb_s: float | None = None  # (steps x weight bytes read per step + context KV read) / wall time
    bandwidth_fraction: float | None = None
    check: RunCheck | None = None  # None: not greedy-diffable (a text-only HTTP API) or the reference itself
    samples: dict[str, list[float]] = field(default_factory=dict)  # raw ttft_ms / e2e_ms for the CDF plots

    @property
    def load_label(self) -> str:
        if self.timed:
            return f"trace, c<={self.concurrency}" if self.concurrency else "trace"
        return f"{self.rate:g}/s" if self.rate is not None else f"c={self.concurrency}"


@dataclass
class Ratio:
    """config vs reference: the ratio of the pooled figures, and the range of the per-repetition ratios
    (rep i of the config against rep i of the reference)."""

    value: float | None = None
    lo: float | None = None
    hi: float | None = None


@dataclass
class Comparison:
    config: str
    reference: str
    workload: str
    workload_spec: str
    shape: str
    concurrency: int | None
    arrival: str
    ttft_x: Ratio  # reference TTFT p50 / config TTFT p50   (> 1: faster first token)
    tpot_x: Ratio  # reference TPOT p50 / config TPOT p50
    e2e_x: Ratio  # reference E2E p50 / config E2E p50
    decode_x: Ratio  # config decode tok/s / reference decode tok/s (decode-only steps, or wall for HTTP)
    output_x: Ratio  # config output tok/s / reference output tok/s
    kv_per_session_ratio: float | None  # config / reference KV bytes per session (< 1: less KV per session)
    peak_kv_ratio: float | None
    incomplete: bool


@dataclass
class PeerResults:
    transformers_version: str | None = None
    phases: list = field(default_factory=list)  # [phases.PhaseRow]: tierlm baseline vs transformers
    notes: list[str] = field(default_factory=list)


@dataclass
class Environment:
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    config_digest: str = ""
    seed: int = 0
    model: str = ""
    context: int = 0
    started_at: str = ""
    plan: dict = field(default_factory=dict)
    load_average_start: float | None = None
    load_average_end: float | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    tiers: dict = field(default_factory=dict)  # the lower KV tiers set up for the run (bench/tiers.py), if any


@dataclass
class BenchResult:
    command: str = ""
    environment: Environment = field(default_factory=Environment)
    configs: list[ConfigInfo] = field(default_factory=list)
    workloads: list[WorkloadInfo] = field(default_factory=list)
    gates: list[ConfigGate] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    peers: PeerResults = field(default_factory=PeerResults)
    notes: list[str] = field(default_factory=list)
    incomplete: bool = True  # set False only when every planned step ran
    stopped_during: str | None = None

    def gate_for(self, config: str) -> ConfigGate | None:
        return next((g for g in self.gates if g.config == config), None)

    def flagged_configs(self) -> list[str]:
        """Configurations whose gate or any of whose runs diverged beyond tolerance."""
        out = [g.config for g in self.gates if g.flagged]
        out += [r.config for r in self.runs if r.check is not None and r.check.flagged]
        return list(dict.fromkeys(out))

    def to_dict(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["flagged"] = self.flagged_configs()
        for g, d in zip(self.gates, doc["gates"]):  # properties asdict does not see
            d["flagged"], d["reason"] = g.flagged, g.reason
        return doc

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
