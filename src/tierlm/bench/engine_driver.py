"""The in-process driver: sends a workload through LLMEngine.add_request/step and times every token.

One loop, single-threaded, as a server's engine loop runs:

    admit   closed loop: top up to `concurrency` requests in flight;
            open loop: every request whose arrival offset has passed (up to the cap);
            a dependent request (a multi-turn round) only once the request it continues has finished,
            at the first admission after that step, with its prompt resolved from that request's
            prompt and actual output tokens (workloads.resolve_prompt; arrivals.ArrivalQueue)
    step    engine.step(), timed; each output's new tokens are stamped with the step's end time, and the
            step's time is booked by its kind (decode-only, prefill-only, mixed: engine.last_step)
    sample  KV blocks referenced and sessions running (for bytes/session); the step's context tokens (GB/s)
    tiers   (an engine with lower KV tiers) a step is a "load step" when a tier load was in flight during
            it: started in it (a load within the step's byte budget is waited for inside the step), or
            still loading before or after it (scheduler.loading); the tokens it made are marked on
            their records (RequestRecord.load_token_idx: the "ITL during loads" sample), and the tiers'
            traffic and fallbacks over the run are kept (TierTraffic: counter deltas, queued writes flushed)

Requests are greedy with EOS ignored, so every configuration produces the same number of tokens, and
each finished request's token ids (and the prompt it was sent, resolved) are kept for the diff against the
reference configuration.
The run fills `EngineRun` as it goes: if it is interrupted (Ctrl-C) what was measured stays there,
and the requests still in flight are aborted.
"""
from __future__ import annotations

import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from tierlm.bench.arrivals import ArrivalPlan, ArrivalQueue
from tierlm.bench.metrics import RequestRecord, rate
from tierlm.bench.workloads import BenchRequest, resolve_prompt
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.llm_engine import LLMEngine


@dataclass
class StepStats:
    """Engine steps of a run by kind, with their wall time and tokens.

    decode_tok_per_s: decode tokens / seconds of decode-only steps, the speed of decode compute with no
    prefill in the batch (TPOT, per request, also includes waiting behind prefills); prefill_tok_per_s:
    the same for prefill-only steps. Mixed steps (prefill chunks next to decodes, with chunked prefill)
    are counted apart, so their share says how much of the run these two figures cover."""

    steps: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    mixed_steps: int = 0
    mixed_s: float = 0.0
    mixed_tokens: int = 0
    max_step_tokens: int = 0

    def add(self, kind: str, seconds: float, decode_tokens: int, prefill_tokens: int) -> None:
        self.steps += 1
        self.max_step_tokens = max(self.max_step_tokens, decode_tokens + prefill_tokens)
        if kind == "decode":
            self.decode_steps += 1
            self.decode_s += seconds
            self.decode_tokens += decode_tokens
        elif kind == "prefill":
            self.prefill_steps += 1
            self.prefill_s += seconds
            self.prefill_tokens += prefill_tokens
        else:
            self.mixed_steps += 1
            self.mixed_s += seconds
            self.mixed_tokens += decode_tokens + prefill_tokens

    def merge(self, other: StepStats) -> None:
        for f in fields(self):  # counters add up; the largest step is the larger one
            op = max if f.name == "max_step_tokens" else operator.add
            setattr(self, f.name, op(getattr(self, f.name), getattr(other, f.name)))

    @property
    def decode_tok_per_s(self) -> float | None:
        return rate(self.decode_tokens, self.decode_s)

    @property
    def prefill_tok_per_s(self) -> float | None:
        return rate(self.prefill_tokens, self.prefill_s)

    @property
    def mixed_fraction(self) -> float | None:
        """Share of step time spent in mixed steps."""
        total = self.decode_s + self.prefill_s + self.mixed_s
        return self.mixed_s / total if total > 0 else None


def _add_dicts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}


@dataclass
class TierTraffic:
    """What the lower KV tiers did during a run (deltas of the engine's counters; None-free, zero without
    movement). Per tier (host, disk, redis): bytes loaded into the device pool and stored into the tier,
    corrupt entries found, backend errors, and the tokens loaded (controller hit tokens). Fallbacks are
    prompt tokens found in a tier but recomputed: the cost model said recompute was faster (cost), the load
    missed its deadline (timeout), or an entry was corrupt/gone or a tier failed (corrupt). Loads: jobs
    started, of which `async_loads` were still loading when the step that started them ended (larger than
    the step's byte budget: they ran while other requests decoded; the rest a step waited for);
    `load_steps` engine steps ran with a load in flight, at most `max_loads_in_flight` requests loading at
    once (scheduler.loading, or 1 for a step that waited for a load)."""

    bytes_loaded: dict[str, int] = field(default_factory=dict)
    bytes_stored: dict[str, int] = field(default_factory=dict)
    hit_tokens: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    fallback_cost_tokens: int = 0
    fallback_timeout_tokens: int = 0
    fallback_corrupt_tokens: int = 0
    load_jobs: int = 0
    async_loads: int = 0
    load_steps: int = 0
    max_loads_in_flight: int = 0
    offloads: int = 0  # preemptions whose blocks went to host memory instead of being recomputed
    demoted_blocks: int = 0
    dropped_writes: int = 0

    @property
    def fallback_tokens(self) -> int:
        return self.fallback_cost_tokens + self.fallback_timeout_tokens + self.fallback_corrupt_tokens

    def merge(self, other: TierTraffic) -> None:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                setattr(self, f.name, _add_dicts(a, b))
            else:
                setattr(self, f.name, max(a, b) if f.name == "max_loads_in_flight" else a + b)


_PER_TIER = ("bytes_loaded", "bytes_stored", "hit_tokens", "corrupt", "errors")
_CONTROLLER = {"fallback_cost_tokens": "fallback_cost", "fallback_timeout_tokens": "fallback_timeout",
               "fallback_corrupt_tokens": "fallback_corrupt", "load_jobs": "load_jobs",
               "demoted_blocks": "demoted_blocks", "dropped_writes": "dropped_writes"}


def tier_counters(engine: LLMEngine) -> TierTraffic | None:
    """The engine's tier counters now (since it was built), or None without tiers."""
    tiers = engine.tiers
    if tiers is None:
        return None
    per = engine.tier_stats()
    out = TierTraffic(**{k: {t: int(d.get(k, 0)) for t, d in per.items()} for k in _PER_TIER},
                      **{k: int(getattr(tiers.stats, attr)) for k, attr in _CONTROLLER.items()})
    out.offloads = engine.scheduler.num_offloads
    return out


_DRIVER_COUNTED = ("async_loads", "load_steps", "max_loads_in_flight")  # by run_engine, not the engine


def tier_delta(after: TierTraffic, before: TierTraffic) -> TierTraffic:
    out = TierTraffic()
    for f in fields(out):
        a, b = getattr(after, f.name), getattr(before, f.name)
        if isinstance(a, dict):
            setattr(out, f.name, {k: a[k] - b.get(k, 0) for k in a})
        elif f.name not in _DRIVER_COUNTED:
            setattr(out, f.name, a - b)
    return out


@dataclass
class EngineRun:
    records: list[RequestRecord] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    step_stats: StepStats = field(default_factory=StepStats)
    peak_kv_blocks: int = 0
    peak_sessions: int = 0
    kv_bytes_per_session: float | None = None  # referenced KV bytes / running sessions at the peak sample
    kv_read_bytes: int = 0  # KV the steps' attention read: sum over steps of the scheduled context x bytes/token
    evictions: int = 0
    preemptions: int = 0
    tiers: TierTraffic | None = None  # None: the engine has no lower tiers
    complete: bool = False

    @property
    def wall_s(self) -> float:
        return max(0.0, self.end - self.start)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_engine(engine: LLMEngine, requests: list[BenchRequest], plan: ArrivalPlan, run: EngineRun | None = None,
               on_request_done: Callable[[], None] | None = None) -> EngineRun:
    run = run if run is not None else EngineRun()
    queue = ArrivalQueue(plan, [r.arrival_s for r in requests], [r.history_from for r in requests])
    inflight: dict[str, RequestRecord] = {}
    finished: dict[int, RequestRecord] = {}  # by workload index: what dependent requests continue
    kv = engine.kv
    evict0, preempt0 = kv.stats.evictions, engine.scheduler.num_preemptions
    tiers = engine.tiers
    tiers0 = tier_counters(engine)
    load_steps = max_loading = async_loads = 0
    run.start = time.monotonic()
    queue.start(run.start)
    try:
        while queue or inflight:
            now = time.monotonic()
            while (nxt := queue.pop(now, len(inflight))) is not None:
                i, sent = nxt
                req = requests[i]
                parent = finished.get(req.history_from) if req.history_from is not None else None
                prompt = resolve_prompt(req, *((parent.prompt_ids, parent.token_ids) if parent else ()))
                rid = engine.add_request(list(prompt), greedy(req.max_tokens), request_id=f"bench-{i}")
                rec = RequestRecord(sent=sent, num_input=len(prompt), index=i, prompt_ids=prompt)
                run.records.append(rec)
                inflight[rid] = rec
            if not inflight:
                due = queue.next_due()
                if due is None:  # nothing queued and nothing running: no request can ever be sent
                    raise RuntimeError("bench: requests left that wait on requests that never ran")
                time.sleep(max(0.0, due - time.monotonic()))
                continue
            if tiers is not None:
                loading0, jobs0 = {r.request_id for r in engine.scheduler.loading}, tiers.stats.load_jobs
            t0 = time.monotonic()
            outputs = engine.step()
            t = time.monotonic()
            summary = engine.last_step
            during_load = False
            if tiers is not None:
                loading1 = {r.request_id for r in engine.scheduler.loading}
                started = tiers.stats.load_jobs != jobs0
                during_load = bool(loading0 or loading1 or started)
                async_loads += len(loading1 - loading0)
                max_loading = max(max_loading, len(loading0), len(loading1), int(started))
            if summary is not None:
                run.step_stats.add(summary.kind, t - t0, summary.decode_tokens, summary.prefill_tokens)
                run.kv_read_bytes += summary.context_tokens * engine.kv_spec.bytes_per_token
                load_steps += during_load
            for out in outputs:
                rec = inflight.get(out.request_id)
                if rec is None:
                    continue
                old = len(rec.token_times)
                new = len(out.outputs[0].token_ids) - old
                rec.token_times.extend([t] * new)
                if during_load:
                    rec.load_token_idx.extend(range(old, old + new))
                if out.finished:
                    rec.done, rec.num_cached = t, out.num_cached_tokens
                    rec.cached_by_tier = dict(out.cached_tokens_by_tier or {})
                    rec.token_ids = list(out.outputs[0].token_ids)
                    del inflight[out.request_id]
                    finished[rec.index] = rec
                    queue.finished(rec.index, t)
                    if on_request_done:
                        on_request_done()
            _sample(engine, run)
        run.complete = True
    finally:
        run.end = time.monotonic()
        for rid in list(inflight):
            engine.abort_request(rid)
        run.evictions = kv.stats.evictions - evict0
        run.preemptions = engine.scheduler.num_preemptions - preempt0
        if tiers0 is not None:
            tiers.flush()  # the run's queued disk/Redis writes land in its own byte counts
            run.tiers = tier_delta(tier_counters(engine), tiers0)
            run.tiers.load_steps, run.tiers.max_loads_in_flight = load_steps, max_loading
            run.tiers.async_loads = async_loads
    return run


def _sample(engine: LLMEngine, run: EngineRun) -> None:
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    running = engine.scheduler.running
    if used > run.peak_kv_blocks or (used == run.peak_kv_blocks and len(running) > run.peak_sessions):
        run.peak_kv_blocks = used
        if running:
            run.kv_bytes_per_session = used * engine.kv_spec.page_size_bytes / len(running)
    run.peak_sessions = max(run.peak_sessions, len(running))


def warm_up(engine: LLMEngine, requests: list[BenchRequest]) -> None:
    """Run a few requests unmeasured (first-call allocations, kernels), then forget their cached prefixes
    (on the device and in every lower tier)."""
    if requests:
        run_engine(engine, requests, ArrivalPlan(concurrency=len(requests)))
    reset_prefix_cache(engine)


def reset_prefix_cache(engine: LLMEngine) -> None:
    """Drop every cached prefix, on the device and in the lower KV tiers (their entries and hit counts), so
    repetitions (and configs) start from the same cold cache. Called before each repetition and after the
    warm-up (the runner also clears an engine's tiers before closing it: release_tiers)."""
    if not engine.has_unfinished_requests():
        engine.kv.reset_prefix_cache()
        if engine.tiers is not None:
            engine.tiers.clear()


def release_tiers(engine: LLMEngine) -> None:
    """Done with this engine: drop what it stored in its lower tiers (a shared Redis keeps nothing of the
    run) and stop the tier threads. Unlike LLMEngine.close(), nothing is persisted. A no-op without tiers."""
    if engine.tiers is None:
        return
    try:
        if not engine.has_unfinished_requests():
            engine.tiers.clear()
    finally:
        engine.tiers.close()
