"""BenchRunner: one benchmark from a preflighted plan to a filled BenchResult.

    lower KV tiers (if a config uses them): their locations for the run (bench/tiers.py: host size, a
                                        temporary disk directory, a Redis server), torn down at the end
    for each config (baseline first):   gate: a small engine of the config runs the gate set (gate.py), with
                                        the config's tiers (so its evictions go down and wave 2 loads back)
                                        then the measured engine: warm up, every workload x arrival plan
                                        x repetition (prefix cache and tiers cleared before each one); each
                                        run's greedy tokens diffed against the baseline's same requests;
                                        one profiled step of the run's largest size for the activations
    transformers peer (same process):   a fresh baseline engine and transformers' generate() alternate rep
                                        by rep on the phase shapes (phases.measure_paired); transformers'
                                        greedy tokens on the gate set become a second reference
    HTTP peers (by URL):                `tierlm serve` (a subprocess on loopback, the same engine flags) and
                                        each peer through the same HTTP driver, every workload x arrival
    always, even after Ctrl-C:          comparisons (runs vs their reference runs), gates vs transformers

Each finished step lands in the result at once, so an interrupted run keeps what it measured;
`result.incomplete` stays True and `stopped_during` names the step that was cut.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import statistics
import sys
import time

from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.comparison import SERVE, compare_runs
from tierlm.bench.configs import BASELINE, engine_config, gate_engine_config, get_config, reference_config
from tierlm.bench.engine_driver import (
    EngineRun,
    StepStats,
    TierTraffic,
    release_tiers,
    reset_prefix_cache,
    run_engine,
    warm_up,
)
from tierlm.bench.gate import (
    GATE_CHUNK,
    ConfigGate,
    build_gate_set,
    compare,
    first_divergence,
    gate_pool_blocks,
    in_order,
    lossy_compare,
    lossy_probe,
    run_gate,
)
from tierlm.bench.machine import config_digest, describe_machine, measure_bandwidth, versions
from tierlm.bench.memory import PeakMemory, activation_peak_bytes, weight_bytes
from tierlm.bench.metrics import spread, summarize
from tierlm.bench.plan import BenchPlan, Preflight
from tierlm.bench.results import (
    TIERS,
    BenchResult,
    ConfigInfo,
    MemoryFigures,
    RepFigures,
    RunCheck,
    RunResult,
    WorkloadInfo,
)
from tierlm.bench.tiers import BenchTiers
from tierlm.bench.workloads import Workload, build_workload

SAMPLE_CAP = 5000  # raw latencies kept per run for the CDF plot


class BenchRunner:
    def __init__(self, plan: BenchPlan, pre: Preflight, result: BenchResult, progress=None):
        self.plan, self.pre, self.result = plan, pre, result
        self.bar = progress
        self.gate_set = build_gate_set(pre.tokenizer, plan.gate_prompts, plan.gate_long_len)
        self.transformers_gate: list[list[int]] | None = None  # transformers' tokens, in gate order
        self.peer_dtype = None
        self.reference_tokens: dict[tuple[str, str], dict[int, list[int]]] = {}  # (workload, arrival) -> tokens
        self.bandwidth: float | None = None
        self.tiers = BenchTiers(plan, plan.needed_tiers)
        self.lossy_needed = any(get_config(n).lossy for n in plan.configs)
        self.lossy_reference = None  # the baseline gate engine's LossyProbe, when a lossy config runs

    # ---- top level -----------------------------------------------------------------------------
    def run(self) -> BenchResult:
        res, plan = self.result, self.plan
        try:
            self._stage("environment")
            self.bandwidth = measure_bandwidth(128 << 20, 5) if plan.device != "cuda" else None
            env = res.environment
            env.machine = describe_machine(plan.device, self.bandwidth)
            env.versions = versions()
            env.config_digest = config_digest(plan.describe())
            env.seed, env.model, env.context = plan.seed, self.pre.model_config.model_id, self.pre.context
            env.started_at, env.plan = time.strftime("%Y-%m-%dT%H:%M:%S%z"), plan.describe()
            env.load_average_start = _loadavg()
            res.workloads = [WorkloadInfo(w.name, w.spec, w.shape, len(w.requests), w.max_seq_len,
                                          w.shared_prefix_tokens) for w in self.pre.workloads]
            if self.tiers.needed:
                self._stage("KV tiers: set up")
                self.tiers.open()
                env.tiers = self.tiers.info
            for name in plan.configs:
                self._run_config(name)
            if plan.peer:
                self._run_transformers()
            if plan.peer_urls:
                self._run_http()
            self._stage("done")
            res.incomplete = False
            res.stopped_during = None
        finally:
            self.tiers.close()
            self._note_load()
            self._gate_against_transformers()
            res.comparisons = compare_runs(res.runs)
            res.environment.wall_s = time.monotonic() - self._t0 if hasattr(self, "_t0") else None
        return res

    def _note_load(self) -> None:
        """Record the 1-minute load average; say so when other processes shared the CPUs (noisy numbers)."""
        env = self.result.environment
        env.load_average_end = _loadavg()
        load = max((x for x in (env.load_average_start, env.load_average_end) if x is not None), default=None)
        cpus = os.cpu_count() or 1
        if load is not None and self.plan.device == "cpu" and load > cpus + 0.5:
            self.result.notes.append(
                f"the machine was busy (1-min load average up to {load:.1f} on {cpus} CPUs): other processes "
                "shared the cores, so latencies have outliers; medians (used for the ratios) are more reliable")

    def _stage(self, name: str) -> None:
        now = time.monotonic()
        if not hasattr(self, "_t0"):
            self._t0 = self._t_stage = now
        prev = self.result.stopped_during
        if prev is not None:
            times = self.result.environment.stage_s
            times[prev] = round(times.get(prev, 0.0) + now - self._t_stage, 3)
        self._t_stage = now
        self.result.stopped_during = name
        if self.bar is not None:
            self.bar.set_description(name[:40])

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # ---- engine configs ------------------------------------------------------------------------
    def _reference(self):
        plan = self.plan
        longest = max([w.max_prompt_len for w in self.pre.workloads] + [1])
        return reference_config(plan.model, plan.dtype, plan.device, plan.max_model_len, plan.kv_memory,
                                plan.max_num_seqs, plan.max_num_batched_tokens, longest)

    def _run_config(self, name: str) -> None:
        from tierlm.engine.llm_engine import LLMEngine

        plan, res = self.plan, self.result
        ref = self._reference()
        if self.gate_set.prompts:
            self._stage(f"{name}: gate")
            gcfg = gate_engine_config(name, ref, gate_pool_blocks(self.gate_set, plan.gate_tokens, ref.cache.block_size),
                                      self.gate_set.first_wave_tokens, GATE_CHUNK, self._tiers_for(name))
            with _quiet("tierlm.engine.llm_engine"):  # its pool is small on purpose: no capped-context warning
                gate_engine = LLMEngine(gcfg)
            probe = None
            try:
                tokens = run_gate(gate_engine, self.gate_set, plan.gate_tokens)
                engine_info = gate_engine_info(gate_engine, gcfg)
                if self.lossy_needed and (name == BASELINE or get_config(name).lossy):
                    base = self.result.gate_for(BASELINE)
                    ref_tokens = tokens if name == BASELINE else base.tokens if base is not None else None
                    if ref_tokens is not None:
                        self._stage(f"{name}: lossy gate probe")
                        probe = lossy_probe(gate_engine, self.gate_set, ref_tokens)
                        if name == BASELINE:
                            self.lossy_reference = probe
            finally:
                release_tiers(gate_engine)
            gate_engine = None
            gc.collect()
            self._gate(name, tokens, engine_info, probe)
        self._stage(f"{name}: load")
        cfg = engine_config(name, ref, plan.max_num_batched_tokens, self._tiers_for(name))
        engine = LLMEngine(cfg)
        try:
            self._measure_config(name, engine, cfg)
        finally:
            release_tiers(engine)
        engine = None
        gc.collect()

    def _tiers_for(self, name: str):
        """A fresh TierConfig (own disk directory, own Redis namespace) for the next engine of a tiered config."""
        return self.tiers.for_engine() if get_config(name).tiers else None

    def _measure_config(self, name: str, engine, cfg) -> None:
        plan, res = self.plan, self.result
        resident, read = weight_bytes(engine.model)
        res.configs.append(ConfigInfo(
            name=name, summary=get_config(name).summary, kv_format=engine.kv_spec.kv_format,
            dtype=str(engine.dtype).replace("torch.", ""), attention_backend=engine.attention_backend.name,
            prefix_caching=cfg.cache.enable_prefix_caching, chunked_prefill=cfg.scheduler.enable_chunked_prefill,
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            kv_bytes_per_token=engine.kv_spec.bytes_per_token, kv_pool_bytes=engine.runner.kv_cache_bytes,
            weights_bytes=resident, weights_read_per_step=read, load_s=engine.load_seconds,
            tolerance=get_config(name).tolerance,
            lower_tiers={t: d.get("capacity_bytes") for t, d in engine.tier_stats().items()}))
        if plan.warmup:
            self._stage(f"{name}: warm-up")
            warm = build_workload(f"fixed:n={plan.warmup},isl=48,osl=8", self.pre.tokenizer, plan.seed + 10_000)
            warm_up(engine, warm.requests)
        activations: dict[int, int | None] = {}
        for w in self.pre.workloads:
            for arrival in plan.arrival_plans():
                self._run_engine_workload(name, engine, w, arrival, activations, (resident, read))

    def _gate(self, name: str, tokens: list[list[int]], engine_info: dict, probe=None) -> None:
        gate = ConfigGate(name, tokens, engine=engine_info)
        base = self.result.gate_for(BASELINE)
        if base is not None and name != BASELINE:
            gate.vs_reference = compare(name, base.tokens, tokens, get_config(name).tolerance, BASELINE)
            if get_config(name).lossy and probe is not None and self.lossy_reference is not None:
                gate.lossy = lossy_compare(self.lossy_reference, probe)
        self.result.gates.append(gate)

    def _gate_against_transformers(self) -> None:
        if self.transformers_gate is None:
            return
        import torch

        for gate in self.result.gates:
            gate.vs_transformers = compare(gate.config, self.transformers_gate, gate.tokens,
                                           get_config(gate.config).tolerance, "transformers")
            gate.transformers_advisory = self.peer_dtype != torch.float32

    def _run_engine_workload(self, name: str, engine, w: Workload, arrival: ArrivalPlan,
                             activations: dict[int, int | None], weights: tuple[int, int]) -> None:
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
                result = self._engine_run_result(name, engine, w, arrival, reps, mem_peaks, activations, weights)
                self.result.runs.append(result)

    def _engine_run_result(self, name, engine, w: Workload, arrival: ArrivalPlan, reps: list[EngineRun],
                           mem_peaks: list[dict], activations: dict[int, int | None],
                           weights: tuple[int, int]) -> RunResult:
        """weights: (resident, read per step) bytes of the engine's model (memory.weight_bytes)."""
        plan = self.plan
        records = [r for run in reps for r in run.records]
        wall = sum(run.wall_s for run in reps)
        metrics = summarize(records, wall, plan.slo, plan.usd_per_hour)
        steps = StepStats()
        for run in reps:
            steps.merge(run.step_stats)
        spec = engine.kv_spec
        complete = all(run.complete for run in reps)
        n = steps.max_step_tokens
        if complete and n and n not in activations:  # one profiled step of the run's largest size
            seed = [t for r in w.requests for t in r.prompt_ids][: max(1, n)]
            activations[n] = activation_peak_bytes(engine, (seed * (n // max(1, len(seed)) + 1))[:n])
        per_session = [r.kv_bytes_per_session for r in reps if r.kv_bytes_per_session]
        shared = w.shared_prefix_tokens if engine.kv.enable_prefix_caching else 0
        memory = MemoryFigures(
            kv_bytes_per_token=spec.bytes_per_token,
            kv_bytes_per_session=statistics.median(per_session) if per_session else None,
            peak_kv_bytes=max(r.peak_kv_blocks for r in reps) * spec.page_size_bytes,
            kv_pool_bytes=engine.runner.kv_cache_bytes,
            max_sessions_at_budget=spec.max_sessions(plan.memory_budget, max(1, w.max_seq_len), min(shared, w.max_seq_len)),
            memory_budget_bytes=plan.memory_budget,
            weights_bytes=weights[0], activations_peak_bytes=activations.get(n),
            peak_rss_bytes=max((p["peak_rss_bytes"] for p in mem_peaks if p["peak_rss_bytes"]), default=None),
            peak_rss_scope=mem_peaks[-1]["peak_rss_scope"] if mem_peaks else None,
            peak_device_bytes=max((p["peak_device_bytes"] for p in mem_peaks if p["peak_device_bytes"]), default=None))
        moved = steps.steps * weights[1] + sum(r.kv_read_bytes for r in reps)
        gbs = moved / wall / 1e9 if wall > 0 else None
        traffic = None
        if engine.tiers is not None:
            traffic = TierTraffic()
            for run in reps:
                if run.tiers is not None:
                    traffic.merge(run.tiers)
        return RunResult(
            config=name, driver="in-process", workload=w.name, workload_spec=w.spec, shape=w.shape,
            concurrency=arrival.concurrency, rate=arrival.rate, burstiness=arrival.burstiness,
            arrival=_arrival_label(w, arrival), timed=w.timed, reps=len(reps), incomplete=not complete,
            metrics=metrics, **_per_rep(reps, [run.step_stats for run in reps]), memory=memory,
            cache_hit_rate=tier_hit_rates(metrics, engine.kv.enable_prefix_caching, list(engine.tier_stats())),
            steps=steps, tiers=traffic, evictions=sum(r.evictions for r in reps), preemptions=sum(r.preemptions for r in reps),
            achieved_gb_s=gbs, bandwidth_fraction=gbs / self.bandwidth if gbs and self.bandwidth else None,
            check=self._check(name, w, arrival, records),
            samples={"ttft_ms": [r.ttft * 1e3 for r in records if r.ok][:SAMPLE_CAP],
                     "e2e_ms": [r.e2e * 1e3 for r in records if r.ok][:SAMPLE_CAP]})

    def _check(self, name: str, w: Workload, arrival: ArrivalPlan, records) -> RunCheck | None:
        """This run's greedy tokens against the baseline's for the same requests (same workload and load)."""
        key = (w.spec, _arrival_label(w, arrival))
        got = [(r.index, r.token_ids) for r in records if r.ok and r.token_ids is not None]
        if name == BASELINE:
            ref = self.reference_tokens.setdefault(key, {})
            for i, toks in got:
                ref.setdefault(i, toks)
        ref = self.reference_tokens.get(key)
        if not ref:
            return None
        tolerance = get_config(name).tolerance
        firsts = {i: first_divergence(ref[i], toks) for i, toks in got if i in ref}
        diverged = sorted({i for i, f in firsts.items() if f is not None})
        lossy = get_config(name).lossy  # its gate decides in drift mode; a run's diffs are reported, not gated
        flagged = len(diverged) > tolerance and not lossy
        reason = (f"{len(diverged)} request(s) diverge from {BASELINE}" if flagged else
                  f"advisory: lossy config, {len(diverged)} request(s) diverge" if lossy and diverged else "ok")
        return RunCheck(reference=BASELINE, requests=len(firsts), exact_match=sum(f is None for f in firsts.values()),
                        first_divergence=min((f for f in firsts.values() if f is not None), default=None),
                        diverged_requests=diverged, tolerance=tolerance, flagged=flagged, reason=reason)

    # ---- peers ---------------------------------------------------------------------------------
    def _run_transformers(self) -> None:
        import torch

        from tierlm.bench.phases import EngineSide, TransformersSide, measure_paired
        from tierlm.bench.transformers_peer import load_peer, peer_greedy
        from tierlm.engine.llm_engine import LLMEngine

        plan, res = self.plan, self.result
        self._stage("transformers: load")
        from tierlm.engine.llm_engine import resolve_dtype

        dtype = resolve_dtype(plan.dtype, torch.device(plan.device))  # the engine's own compute dtype
        self.peer_dtype = dtype
        try:
            model = load_peer(plan.model, dtype, plan.device)
        except Exception as e:  # counted and reported, never silent: the peer is optional
            res.notes.append(f"transformers peer skipped: {type(e).__name__}: {e}")
            print(f"tierlm bench: transformers peer skipped ({e})", file=sys.stderr)
            return
        res.peers.transformers_version = versions().get("transformers")
        if self.gate_set.prompts:
            self._stage("transformers: gate")
            per_prompt = peer_greedy(model, self.gate_set.prompts,
                                     [self.gate_set.max_tokens(i, plan.gate_tokens)
                                      for i in range(len(self.gate_set.prompts))],
                                     tuple(self.pre.tokenizer.eos_token_ids))
            self.transformers_gate = in_order(self.gate_set, per_prompt)
        self._stage("transformers: phases")
        longest = max(max(plan.phases.prefill_lens), plan.phases.prompt_len + plan.phases.new_tokens)
        engine = LLMEngine(_phase_engine_config(self._reference(), longest))
        sides = [EngineSide(engine, name="tierlm"), TransformersSide(model, name="transformers", cache_implementation=None)]
        res.peers.phases = measure_paired(sides, self.pre.tokenizer, plan.phases,
                                          progress=lambda row: self._tick(0))
        engine = model = sides = None
        gc.collect()

    def _run_http(self) -> None:
        from tierlm.bench.http_driver import HttpDriver, HttpRun
        from tierlm.bench.server_process import ServerProcess

        plan = self.plan
        self._stage("tierlm serve: start")
        flags = _serve_flags(plan)
        with ServerProcess(flags) as server:
            driver = HttpDriver(server.url, self.pre.tokenizer, None)
            self._http_runs(SERVE, driver, HttpRun)
        for url in plan.peer_urls:
            models = self.pre.server_models.get(url) or []
            driver = HttpDriver(url, self.pre.tokenizer, plan.peer_model or (models[0] if models else None),
                                api_key=plan.peer_api_key)
            self._http_runs(f"http:{url}", driver, HttpRun)

    def _http_runs(self, name: str, driver, run_cls) -> None:
        plan = self.plan
        for w in self.pre.workloads:
            for arrival in plan.arrival_plans():
                self._stage(f"{name}: {w.name} {_short(arrival)}")
                reps = []
                try:
                    for _ in range(plan.reps):
                        run = run_cls()
                        reps.append(run)
                        driver.run(w.requests, arrival, run, on_request_done=self._tick)
                finally:
                    if reps:
                        self.result.runs.append(self._http_run_result(name, w, arrival, reps))

    def _http_run_result(self, name: str, w: Workload, arrival: ArrivalPlan, reps) -> RunResult:
        plan = self.plan
        records = [r for run in reps for r in run.records]
        metrics = summarize(records, sum(r.wall_s for r in reps), plan.slo, plan.usd_per_hour)
        reported = any(r.num_cached for r in records if r.ok)
        by_tier = [t for t in metrics.cached_tokens_by_tier if t != "device"]  # tiers the server reported
        return RunResult(
            config=name, driver="http", workload=w.name, workload_spec=w.spec, shape=w.shape,
            concurrency=arrival.concurrency, rate=arrival.rate, burstiness=arrival.burstiness,
            arrival=_arrival_label(w, arrival), timed=w.timed, reps=len(reps),
            incomplete=not all(r.complete for r in reps), metrics=metrics,
            **_per_rep(reps, [None] * len(reps)),
            memory=MemoryFigures(memory_budget_bytes=plan.memory_budget),
            cache_hit_rate=(tier_hit_rates(metrics, True, by_tier) if metrics.cached_tokens_by_tier
                            else tier_hit_rates(metrics, False, []) | {"device": metrics.hit_rate if reported else None}),
            samples={"ttft_ms": [r.ttft * 1e3 for r in records if r.ok][:SAMPLE_CAP],
                     "e2e_ms": [r.e2e * 1e3 for r in records if r.ok][:SAMPLE_CAP]})


def tier_hit_rates(metrics, prefix_caching: bool, lower: list[str]) -> dict[str, float | None]:
    """Per tier (results.TIERS): cached prompt tokens that came from it / prompt tokens; None for the device
    without prefix caching and for a lower tier the engine does not have."""
    n = metrics.input_tokens
    by = metrics.cached_tokens_by_tier
    out: dict[str, float | None] = {}
    for t in TIERS:
        on = prefix_caching if t == "device" else t in lower
        out[t] = by.get(t, 0) / n if on and n else None
    return out


def gate_engine_info(engine, cfg) -> dict:
    """What the gate's engine exercised: its pool and step budget, preemptions, evictions, device prefix hit
    tokens and, with lower tiers, the tokens loaded back from each (and the bytes) and offloads."""
    info = {"num_blocks": engine.num_kv_blocks, "block_size": cfg.cache.block_size,
            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
            "preemptions": engine.scheduler.num_preemptions, "evictions": engine.kv.stats.evictions,
            "prefix_hit_tokens": engine.kv.stats.prefix_cache_hits}
    stats = engine.tier_stats()
    if stats:
        info["tier_hit_tokens"] = {t: d.get("hit_tokens", 0) for t, d in stats.items()}
        info["tier_bytes_loaded"] = {t: d.get("bytes_loaded", 0) for t, d in stats.items()}
        info["tier_fallback_tokens"] = (engine.tiers.stats.fallback_cost + engine.tiers.stats.fallback_timeout
                                        + engine.tiers.stats.fallback_corrupt)
        info["offloads"] = engine.scheduler.num_offloads
    return info


@contextlib.contextmanager
def _quiet(logger: str):
    """Hold a logger's warnings back for a moment (errors still pass)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _phase_engine_config(reference, longest: int):
    """The baseline engine the phases run on: the reference config, with room for the longest phase prompt
    (prefill runs in one step, as the peer's does)."""
    from dataclasses import replace

    return replace(reference, scheduler=replace(reference.scheduler,
                                                 max_num_batched_tokens=max(reference.scheduler.max_num_batched_tokens,
                                                                            longest)))


def _serve_flags(plan: BenchPlan) -> list[str]:
    """`tierlm serve` flags for the same model and engine sizes as the in-process runs (serve's defaults
    otherwise: prefix caching and chunked prefill on, as users run it)."""
    flags = ["--dtype", plan.dtype, "--device", plan.device, "--kv-cache-memory", str(plan.kv_memory),
             "--max-num-seqs", str(plan.max_num_seqs), "--max-num-batched-tokens", str(plan.max_num_batched_tokens)]
    if plan.model:
        flags += ["--model", str(plan.model)]
    if plan.max_model_len:
        flags += ["--max-model-len", str(plan.max_model_len)]
    return flags


def _per_rep(reps, steps: list[StepStats | None]) -> dict:
    """RunResult's per_rep figures and spread, from one summary of each repetition. A repetition's decode
    rate is its decode-only steps' (in-process) or its wall-clock decode rate (HTTP, steps None)."""
    per = [summarize(run.records, run.wall_s) for run in reps]
    figures = [RepFigures(m.ttft_ms.p50, m.tpot_ms.p50, m.e2e_ms.p50, m.output_tok_per_s,
                          st.decode_tok_per_s if st is not None else m.decode_tok_per_s_wall)
               for m, st in zip(per, steps)]
    return {"per_rep": figures,
            "spread": {"output_tok_per_s": spread([p.output_tok_per_s for p in per]),
                       "ttft_p50_ms": spread([p.ttft_ms.p50 for p in per]),
                       "tpot_p50_ms": spread([p.tpot_ms.p50 for p in per])}}


def _arrival_label(w: Workload, a: ArrivalPlan) -> str:
    if w.timed:
        return "trace timestamps" + (f", max {a.concurrency} in flight" if a.concurrency else "")
    return a.label


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
    servers = (1 + len(plan.peer_urls)) if plan.peer_urls else 0
    return per_config * (len(plan.configs) + servers)
