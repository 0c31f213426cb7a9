"""BenchRunner: one benchmark from a preflighted plan to a filled BenchResult.

    for each config (baseline first):       build an engine, run the gate prompts, warm up,
                                            then every workload x arrival plan x repetition
                                            (prefix cache reset before each repetition)
    transformers peer (same process):       phase speeds + greedy diff against the reference
    HTTP peers (by URL):                    every workload x arrival plan through the HTTP driver
    always, even after Ctrl-C:              comparisons against the baseline

Each finished step lands in the result at once, so an interrupted run keeps what it measured;
`result.incomplete` stays True and `stopped_during` names the step that was cut.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time

from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.comparison import compare_runs, peer_ratios
from tierlm.bench.configs import BASELINE, engine_config, get_config, reference_config
from tierlm.bench.engine_driver import EngineRun, reset_prefix_cache, run_engine, warm_up
from tierlm.bench.gate import compare, engine_greedy, gate_prompt_ids
from tierlm.bench.machine import config_digest, describe_machine, measure_bandwidth, versions
from tierlm.bench.memory import PeakMemory
from tierlm.bench.metrics import spread, summarize
from tierlm.bench.plan import BenchPlan, Preflight
from tierlm.bench.results import TIERS, BenchResult
from tierlm.bench.workloads import Workload, build_workload

SAMPLE_CAP = 5000  # raw latencies kept per run for the CDF plot


class BenchRunner:
    def __init__(self, plan: BenchPlan, pre: Preflight, result: BenchResult, progress=None):
        self.plan, self.pre, self.result = plan, pre, result
        self.bar = progress
        self.reference_tokens: list[list[int]] | None = None
        self.gate_prompts = gate_prompt_ids(pre.tokenizer, plan.gate_prompts)
        self.bandwidth: float | None = None

    # ---- top level -----------------------------------------------------------------------------
    def run(self) -> BenchResult:
        res, plan = self.result, self.plan
        try:
            self._stage("environment")
            self.bandwidth = measure_bandwidth(128 << 20, 5) if plan.device != "cuda" else None
            res.environment = {"machine": describe_machine(plan.device, self.bandwidth), "versions": versions(),
                               "config_digest": config_digest(plan.describe()), "seed": plan.seed,
                               "model": self.pre.model_config.model_id, "context": self.pre.context,
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": plan.describe(),
                               "load_average_start": _loadavg()}
            res.workloads = [{"name": w.name, "spec": w.spec, "shape": w.shape, "requests": len(w.requests)}
                             for w in self.pre.workloads]
            for name in plan.configs:
                self._run_config(name)
            if plan.peer:
                self._run_transformers()
            for url in plan.peer_urls:
                self._run_http(url)
            self._stage("done")
            res.incomplete = False
            res.stopped_during = None
        finally:
            self._note_load()
            res.comparisons = compare_runs(res.runs, BASELINE)
            res.environment["wall_s"] = time.monotonic() - self._t0 if hasattr(self, "_t0") else None
        return res

    def _note_load(self) -> None:
        """Record the 1-minute load average; say so when other processes shared the CPUs (noisy numbers)."""
        env = self.result.environment
        env["load_average_end"] = _loadavg()
        loads = [x for x in (env.get("load_average_start"), env["load_average_end"]) if x is not None]
        load = max(loads, default=None)
        cpus = os.cpu_count() or 1
        if load is not None and self.plan.device == "cpu" and load > cpus + 0.5:
            self.result.notes.append(
                f"the machine was busy (1-min load average up to {load:.1f} on {cpus} CPUs): other processes "
                "shared the cores, so latencies have outliers; medians (used for the speed-ups) are more reliable")

    def _stage(self, name: str) -> None:
        now = time.monotonic()
        if not hasattr(self, "_t0"):
            self._t0 = self._t_stage = now
        prev = self.result.stopped_during
        if prev is not None:
            times = self.result.environment.setdefault("stage_s", {})
            times[prev] = round(times.get(prev, 0.0) + now - self._t_stage, 3)
        self._t_stage = now
        self.result.stopped_during = name
        if self.bar is not None:
            self.bar.set_description(name[:40])

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # ---- engine configs ------------------------------------------------------------------------
    def _engine(self, name: str):
        from tierlm.engine.llm_engine import LLMEngine

        plan = self.plan
        longest = max([w.max_prompt_len for w in self.pre.workloads] + [len(p) for p in self.gate_prompts]
                      + ([plan.phases.prefill_len] if plan.peer else []) + [1])
        ref = reference_config(plan.model, plan.dtype, plan.device, plan.max_model_len, plan.kv_memory,
                               plan.max_num_seqs, plan.max_num_batched_tokens, longest)
        cfg = engine_config(name, ref, plan.max_num_batched_tokens)
        return LLMEngine(cfg), cfg

    def _run_config(self, name: str) -> None:
        plan, res = self.plan, self.result
        self._stage(f"{name}: load")
        engine, cfg = self._engine(name)
        res.configs.append({"name": name, "summary": get_config(name).summary, "load_s": engine.load_seconds,
                            "kv_format": engine.kv_spec.kv_format, "dtype": str(engine.dtype).replace("torch.", ""),
                            "prefix_caching": cfg.cache.enable_prefix_caching,
                            "chunked_prefill": cfg.scheduler.enable_chunked_prefill,
                            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
                            "kv_bytes_per_token": engine.kv_spec.bytes_per_token,
                            "kv_pool_bytes": engine.runner.kv_cache_bytes})
        self._stage(f"{name}: gate")
        self._gate(name, engine_greedy(engine, self.gate_prompts, plan.gate_tokens) if self.gate_prompts else [])
        reset_prefix_cache(engine)
        if name == BASELINE and plan.peer:
            self._stage("baseline: phases")
            from tierlm.bench.phases import engine_generate, measure_phases

            rows = measure_phases(lambda p, n: engine_generate(engine, p, n), self.pre.tokenizer, plan.phases)
            res.peers.setdefault("transformers", {})["tierlm_phases"] = rows
            self._tick(0)
        if plan.warmup:
            self._stage(f"{name}: warm-up")
            warm = build_workload(f"fixed:n={plan.warmup},isl=48,osl=8", self.pre.tokenizer, plan.seed + 10_000)
            warm_up(engine, warm.requests)
        for w in self.pre.workloads:
            for arrival in plan.arrival_plans():
                self._run_engine_workload(name, engine, w, arrival)
        engine = None  # drop it before the next config loads (a closure above still names it)
        gc.collect()

    def _gate(self, name: str, tokens: list[list[int]]) -> None:
        if name == BASELINE:
            self.reference_tokens = tokens
        if self.reference_tokens is None:
            return
        g = compare(name, self.reference_tokens, tokens, get_config(name).tolerance)
        d = g.to_dict()
        d["tokens"] = tokens
        self.result.correctness.append(d)

    def _run_engine_workload(self, name: str, engine, w: Workload, arrival: ArrivalPlan) -> None:
        plan = self.plan
        self._stage(f"{name}: {w.name} {_short(arrival)}")
        reps: list[EngineRun] = []
        mem_peaks = []
        probe = PeakMemory(engine.device.type)
        try:
            for _ in range(plan.reps):
                reset_prefix_cache(engine)
                probe.reset()
                run = EngineRun()
                reps.append(run)
                run_engine(engine, w.requests, arrival, run, on_request_done=self._tick)
                mem_peaks.append(probe.read())
        finally:
            if reps:
                if len(mem_peaks) < len(reps):
                    mem_peaks.append(probe.read())
                self.result.runs.append(self._engine_run_dict(name, engine, w, arrival, reps, mem_peaks))

    def _engine_run_dict(self, name, engine, w, arrival, reps: list[EngineRun], mem_peaks: list[dict]) -> dict:
        plan = self.plan
        records = [r for run in reps for r in run.records]
        wall = sum(run.wall_s for run in reps)
        m = summarize(records, wall, plan.slo, plan.usd_per_hour)
        spec = engine.kv_spec
        per_session = [r.kv_bytes_per_session for r in reps if r.kv_bytes_per_session]
        per_session_val = statistics.median(per_session) if per_session else None
        queries = sum(r.prefix_queries for r in reps)
        hits = sum(r.prefix_hits for r in reps)
        weight_bytes = self.pre.model_config.num_params * engine.dtype.itemsize
        moved = sum(r.steps for r in reps) * weight_bytes + sum(r.kv_read_bytes for r in reps)
        gbs = moved / wall / 1e9 if wall > 0 else None
        m.update({
            "kv_bytes_per_token": spec.bytes_per_token,
            "kv_bytes_per_session": per_session_val,
            "peak_kv_bytes": max(r.peak_kv_blocks for r in reps) * spec.page_size_bytes,
            "peak_sessions": max(r.peak_sessions for r in reps),
            "peak_rss_bytes": max((p["peak_rss_bytes"] for p in mem_peaks if p["peak_rss_bytes"]), default=None),
            "peak_rss_scope": mem_peaks[-1]["peak_rss_scope"] if mem_peaks else None,
            "peak_device_bytes": max((p["peak_device_bytes"] for p in mem_peaks if p["peak_device_bytes"]),
                                     default=None),
            "memory_budget_bytes": plan.memory_budget,
            "max_sessions_at_budget": int(plan.memory_budget // per_session_val) if per_session_val else None,
            "cache_hit_rate": {t: None for t in TIERS} | (
                {"device": hits / queries if queries else 0.0} if engine.kv.enable_prefix_caching else {}),
            "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "evictions": sum(r.evictions for r in reps), "preemptions": sum(r.preemptions for r in reps),
            "steps": sum(r.steps for r in reps),
            "achieved_gb_s": gbs,
            "bandwidth_fraction": gbs / self.bandwidth if gbs and self.bandwidth else None,
        })
        return self._run_dict(name, "in-process", w, arrival, reps, records, m)

    def _run_dict(self, name, driver, w, arrival, reps, records, m) -> dict:
        per_rep = [summarize(run.records, run.wall_s) for run in reps]
        gate = self.result.gate_for(name)
        ok = [r for r in records if r.ok]
        return {
            "config": name, "driver": driver, "workload": w.name, "workload_spec": w.spec, "shape": w.shape,
            "concurrency": arrival.concurrency, "rate": arrival.rate, "burstiness": arrival.burstiness,
            "arrival": ("trace timestamps" + (f", max {arrival.concurrency} in flight" if arrival.concurrency else "")
                        if w.timed else arrival.label), "timed": w.timed, "reps": len(reps), "incomplete": not all(r.complete for r in reps),
            "metrics": m,
            "spread": {"output_tok_per_s": spread([p["output_tok_per_s"] for p in per_rep]),
                       "ttft_p50_ms": spread([p["ttft_ms"]["p50"] for p in per_rep]),
                       "tpot_p50_ms": spread([p["tpot_ms"]["p50"] for p in per_rep])},
            "correctness": ({k: gate[k] for k in ("prompts", "exact_match", "repeat_anomalies", "first_divergence",
                                                  "flagged", "reason")} if gate else
                            {"prompts": 0, "exact_match": None, "repeat_anomalies": None, "flagged": False,
                             "reason": "not gated (text-only API: no token ids to diff)"}),
            "samples": {"ttft_ms": [r.ttft * 1e3 for r in ok][:SAMPLE_CAP],
                        "e2e_ms": [r.e2e * 1e3 for r in ok][:SAMPLE_CAP]},
        }

    # ---- peers ---------------------------------------------------------------------------------
    def _run_transformers(self) -> None:
        import torch

        from tierlm.bench.phases import measure_phases
        from tierlm.bench.transformers_peer import load_peer, peer_greedy, run_transformers

        plan, res = self.plan, self.result
        self._stage("transformers: load")
        dtype = torch.float32 if plan.dtype in ("auto", "fp32") and plan.device != "cuda" else torch.bfloat16
        try:
            model = load_peer(plan.model, dtype)
        except Exception as e:  # counted and reported, never silent: the peer is optional
            res.notes.append(f"transformers peer skipped: {type(e).__name__}: {e}")
            print(f"tierlm bench: transformers peer skipped ({e})", file=sys.stderr)
            return
        peer = res.peers.setdefault("transformers", {})
        peer["version"] = versions().get("transformers")
        self._stage("transformers: phases")
        rows = measure_phases(lambda p, n: run_transformers(model, p, n, None), self.pre.tokenizer, plan.phases)
        peer["phases"] = rows
        peer["ratios"] = peer_ratios(peer.get("tierlm_phases", []), rows)
        if self.gate_prompts and self.reference_tokens is not None:
            self._stage("transformers: gate")
            toks = peer_greedy(model, self.gate_prompts, plan.gate_tokens, tuple(self.pre.tokenizer.eos_token_ids))
            g = compare("transformers", self.reference_tokens, toks).to_dict()
            g["informational"] = True
            peer["gate"] = g
        model = None  # free the peer (a closure above still names it)
        gc.collect()

    def _run_http(self, url: str) -> None:
        from tierlm.bench.http_driver import HttpDriver, HttpRun

        plan = self.plan
        models = self.pre.server_models.get(url) or []
        driver = HttpDriver(url, self.pre.tokenizer, plan.peer_model or (models[0] if models else None),
                            api_key=plan.peer_api_key)
        name = f"http:{url}"
        for w in self.pre.workloads:
            for arrival in plan.arrival_plans():
                self._stage(f"{name}: {w.name} {_short(arrival)}")
                reps: list[HttpRun] = []
                try:
                    for _ in range(plan.reps):
                        run = HttpRun()
                        reps.append(run)
                        driver.run(w.requests, arrival, run, on_request_done=self._tick)
                finally:
                    if reps:
                        records = [r for run in reps for r in run.records]
                        m = summarize(records, sum(r.wall_s for r in reps), plan.slo, plan.usd_per_hour)
                        ok = [r for r in records if r.ok]
                        n_in = sum(r.num_input for r in ok)
                        cached = sum(r.num_cached for r in ok)
                        m.update({"kv_bytes_per_token": None, "kv_bytes_per_session": None, "peak_kv_bytes": None,
                                  "peak_rss_bytes": None, "max_sessions_at_budget": None,
                                  "cache_hit_rate": {t: None for t in TIERS} | (
                                      {"device": cached / n_in} if cached and n_in else {})})
                        self.result.runs.append(self._run_dict(name, "http", w, arrival, reps, records, m))


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _short(a: ArrivalPlan) -> str:
    return f"{a.rate:g}/s" if a.rate is not None else f"c={a.concurrency}"


def planned_requests(plan: BenchPlan, pre: Preflight) -> int:
    """Measured requests the whole run will send (the progress bar's total)."""
    per_config = sum(len(w.requests) for w in pre.workloads) * len(plan.arrival_plans()) * plan.reps
    return per_config * (len(plan.configs) + len(plan.peer_urls))
