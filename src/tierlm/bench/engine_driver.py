"""The in-process driver: sends a workload through LLMEngine.add_request/step and times every token.

One loop, single-threaded, as a server's engine loop runs:

    admit   closed loop: top up to `concurrency` requests in flight;
            open loop: every request whose arrival offset has passed (up to the cap)
    step    engine.step(), timed; each output's new tokens are stamped with the step's end time, and the
            step's time is booked by its kind (decode-only, prefill-only, mixed: engine.last_step)
    sample  KV blocks referenced and sessions running (for bytes/session); the step's context tokens (GB/s)

Requests are greedy with EOS ignored, so every configuration produces the same number of tokens, and
each finished request's token ids are kept for the diff against the reference configuration.
The run fills `EngineRun` as it goes: if it is interrupted (Ctrl-C) what was measured stays there,
and the requests still in flight are aborted.
"""
from __future__ import annotations

import operator
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from tierlm.bench.arrivals import ArrivalPlan, arrival_times
from tierlm.bench.metrics import RequestRecord, rate
from tierlm.bench.workloads import BenchRequest
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
    evict0, preempt0 = kv.stats.evictions, engine.scheduler.num_preemptions
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
                rec = RequestRecord(sent=sent, num_input=len(req.prompt_ids), index=i)
                run.records.append(rec)
                inflight[rid] = rec
            if not inflight:
                time.sleep(max(0.0, run.start + offsets[pending[0]] - time.monotonic()))
                continue
            t0 = time.monotonic()
            outputs = engine.step()
            t = time.monotonic()
            summary = engine.last_step
            if summary is not None:
                run.step_stats.add(summary.kind, t - t0, summary.decode_tokens, summary.prefill_tokens)
                run.kv_read_bytes += summary.context_tokens * engine.kv_spec.bytes_per_token
            for out in outputs:
                rec = inflight.get(out.request_id)
                if rec is None:
                    continue
                new = len(out.outputs[0].token_ids) - len(rec.token_times)
                rec.token_times.extend([t] * new)
                if out.finished:
                    rec.done, rec.num_cached = t, out.num_cached_tokens
                    rec.token_ids = list(out.outputs[0].token_ids)
                    del inflight[out.request_id]
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
    """Run a few requests unmeasured (first-call allocations, kernels), then forget their cached prefixes."""
    if requests:
        run_engine(engine, requests, ArrivalPlan(concurrency=len(requests)))
    reset_prefix_cache(engine)


def reset_prefix_cache(engine: LLMEngine) -> None:
    """Drop every cached prefix so repetitions (and configs) start from the same cold cache."""
    if not engine.has_unfinished_requests():
        engine.kv.reset_prefix_cache()
