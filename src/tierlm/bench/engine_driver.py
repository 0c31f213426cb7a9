"""The in-process driver: sends a workload through LLMEngine.add_request/step and times every token.

One loop, single-threaded, as a server's engine loop runs:

    admit   closed loop: top up to `concurrency` requests in flight;
            open loop: every request whose arrival offset has passed (up to the cap)
    step    engine.step(); each output's new tokens are stamped with the step's end time
    sample  KV blocks referenced, sessions running, context tokens read (for bytes/session, GB/s)

Requests are greedy with EOS ignored, so every configuration produces the same number of tokens.
The run fills `EngineRun` as it goes: if it is interrupted (Ctrl-C) what was measured stays there,
and the requests still in flight are aborted.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tierlm.bench.arrivals import ArrivalPlan, arrival_times
from tierlm.bench.metrics import RequestRecord
from tierlm.bench.workloads import BenchRequest
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.llm_engine import LLMEngine


@dataclass
class EngineRun:
    records: list[RequestRecord] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    peak_kv_blocks: int = 0
    peak_sessions: int = 0
    kv_bytes_per_session: float | None = None  # referenced KV bytes / running sessions at the peak sample
    kv_read_bytes: int = 0  # context KV read by the steps (sum over steps of running context x bytes/token)
    steps: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    evictions: int = 0
    preemptions: int = 0
    complete: bool = False

    @property
    def wall_s(self) -> float:
        return max(0.0, self.end - self.start)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_engine(engine: LLMEngine, requests: list[BenchRequest], plan: ArrivalPlan, run: EngineRun | None = None,
               on_request_done: Callable[[], None] | None = None) -> EngineRun:
    run = run if run is not None else EngineRun()
    offsets = arrival_times(plan, [r.arrival_s for r in requests])
    cap = plan.concurrency
    pending = deque(range(len(requests)))
    inflight: dict[str, RequestRecord] = {}
    kv = engine.kv
    stats0, preempt0, steps0 = kv.stats, engine.scheduler.num_preemptions, engine.counters["steps"]
    run.start = time.monotonic()
    try:
        while pending or inflight:
            now = time.monotonic()
            while pending and (cap is None or len(inflight) < cap):
                i = pending[0]
                if offsets is not None and run.start + offsets[i] > now:
                    break
                pending.popleft()
                req = requests[i]
                sent = run.start + offsets[i] if offsets is not None else now
                rid = engine.add_request(list(req.prompt_ids), greedy(req.max_tokens), request_id=f"bench-{i}")
                rec = RequestRecord(sent=sent, num_input=len(req.prompt_ids))
                run.records.append(rec)
                inflight[rid] = rec
            if not inflight:
                time.sleep(max(0.0, run.start + offsets[pending[0]] - time.monotonic()))
                continue
            outputs = engine.step()
            t = time.monotonic()
            for out in outputs:
                rec = inflight.get(out.request_id)
                if rec is None:
                    continue
                new = len(out.outputs[0].token_ids) - len(rec.token_times)
                rec.token_times.extend([t] * new)
                if out.finished:
                    rec.done, rec.num_cached = t, out.num_cached_tokens
                    del inflight[out.request_id]
                    if on_request_done:
                        on_request_done()
            _sample(engine, run)
        run.complete = True
    finally:
        run.end = time.monotonic()
        for rid in list(inflight):
            engine.abort_request(rid)
        stats = kv.stats
        run.prefix_queries = stats.prefix_cache_queries - stats0.prefix_cache_queries
        run.prefix_hits = stats.prefix_cache_hits - stats0.prefix_cache_hits
        run.evictions = stats.evictions - stats0.evictions
        run.preemptions = engine.scheduler.num_preemptions - preempt0
        run.steps = engine.counters["steps"] - steps0
    return run


def _sample(engine: LLMEngine, run: EngineRun) -> None:
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    running = engine.scheduler.running
    run.kv_read_bytes += sum(r.num_computed_tokens for r in running) * engine.kv_spec.bytes_per_token
    if used > run.peak_kv_blocks or (used == run.peak_kv_blocks and len(running) > run.peak_sessions):
        run.peak_kv_blocks = used
        if running:
            run.kv_bytes_per_session = used * engine.kv_spec.page_size_bytes / len(running)
    run.peak_sessions = max(run.peak_sessions, len(running))


def warm_up(engine: LLMEngine, requests: list[BenchRequest]) -> None:
    """Run a few requests unmeasured (first-call allocations, kernels), then forget their cached prefixes."""
    if requests:
        run_engine(engine, requests, ArrivalPlan(concurrency=len(requests)))
    reset_prefix_cache(engine)


def reset_prefix_cache(engine: LLMEngine) -> None:
    """Drop every cached prefix so repetitions (and configs) start from the same cold cache."""
    if not engine.has_unfinished_requests():
        engine.kv.reset_prefix_cache()
