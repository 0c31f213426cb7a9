"""Latency and throughput metrics from request timelines. Pure arithmetic, no engine.

Definitions (REFERENCE.md section 6; all times in seconds on one monotonic clock):

    TTFT  = first_token - sent            (sent: the scheduled arrival in open loop)
    E2E   = done - sent
    TPOT  = (E2E - TTFT) / (n_out - 1)     per request; includes any wait behind other requests' prefills
    ITL   = gaps between consecutive token arrivals of one request, pooled over requests
    ITL during loads = the ITLs of tokens made in an engine step during which a KV tier load was in flight
            (started or waited for in that step, or still loading before or after it: engine_driver); None
            when no step had a load (configs without tiers)
    requests/s, output tok/s, total tok/s: completed requests and their tokens over the wall time
    prefill tok/s (wall) = input tokens / time some request was waiting for its first token
    decode tok/s (wall)  = (output tokens - one per request) / time some request was decoding
                           (both "time" figures are the length of the union of the per-request intervals,
                           so overlap under load is counted once; they include queueing)
    hit rate = cached prompt tokens / prompt tokens, over the completed requests (the same definition for
               the in-process engine and for servers reporting usage.prompt_tokens_details.cached_tokens);
               per tier: the cached prompt tokens that came from that tier (device, host, disk, redis:
               RequestOutput.cached_tokens_by_tier) / prompt tokens; the tiers' rates add up to the hit rate
    goodput = completed requests meeting every SLO given, per second (and as a fraction)

Engine-side step figures (decode tok/s of decode-only steps, ...) are measured by the in-process driver,
not derived here: see engine_driver.StepStats.

Percentiles interpolate linearly between closest ranks (numpy's default); an empty set gives None.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    sent: float
    num_input: int
    token_times: list[float] = field(default_factory=list)  # one arrival time per output token
    done: float | None = None
    num_output: int | None = None  # the server's count where it reports one (else len(token_times))
    num_cached: int = 0
    error: str | None = None
    index: int = -1  # the request's position in its workload (to diff tokens against the reference)
    token_ids: list[int] | None = None  # greedy output tokens, where the driver sees them (in-process)
    text: str = ""  # streamed output text, where the driver sees text (HTTP)
    prompt_ids: list[int] | None = None  # the prompt as sent (a dependent request's resolved from its parent's reply)
    cached_by_tier: dict[str, int] = field(default_factory=dict)  # of num_cached, where they came from
    load_token_idx: list[int] = field(default_factory=list)  # tokens made in steps with a tier load in flight

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and bool(self.token_times)

    @property
    def n_out(self) -> int:
        return self.num_output if self.num_output is not None else len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.n_out - 1) if self.n_out > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def itls_during_loads(self) -> list[float]:
        """The ITLs of this request's tokens made while a tier load was in flight (its first token has none)."""
        t = self.token_times
        return [t[i] - t[i - 1] for i in self.load_token_idx if 0 < i < len(t)]


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if self.ttft_ms is not None and r.ttft * 1e3 > self.ttft_ms:
            return False
        if self.tpot_ms is not None and r.tpot is not None and r.tpot * 1e3 > self.tpot_ms:
            return False
        return self.e2e_ms is None or r.e2e * 1e3 <= self.e2e_ms

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


@dataclass
class Dist:
    """A latency distribution in milliseconds."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None


@dataclass
class RunMetrics:
    """What one run (or several repetitions pooled) measured from request timelines."""

    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2e_ms: Dist
    requests: int
    failed_requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    wall_s: float
    requests_per_s: float | None
    output_tok_per_s: float | None
    total_tok_per_s: float | None
    prefill_tok_per_s_wall: float | None
    decode_tok_per_s_wall: float | None
    hit_rate: float | None  # cached prompt tokens / prompt tokens
    goodput_req_per_s: float | None = None
    goodput_fraction: float | None = None
    usd_per_million_tokens: float | None = None
    itl_during_loads_ms: Dist = field(default_factory=Dist)  # ITLs of tokens made while a tier load was in flight
    itl_during_loads_samples: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # cached_tokens, by the tier they came from


@dataclass
class Spread:
    """One figure across repetitions: min / median / max and (max - min) / median (None below 2 reps)."""

    min: float | None = None
    median: float | None = None
    max: float | None = None
    rel_spread: float | None = None
    reps: int = 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Iterable[float]) -> Dist:
    """p50 / p90 / p99 / mean in milliseconds of values given in seconds."""
    xs = [v * 1e3 for v in values_s]
    return Dist(*(percentile(xs, q) for q in PERCENTILES), mean=sum(xs) / len(xs) if xs else None)


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the union of [start, end] intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if e < s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def rate(num: float, seconds: float) -> float | None:
    return num / seconds if seconds > 0 else None


def usd_per_million(usd_per_hour: float | None, tok_per_s: float | None) -> float | None:
    """$ per 1M tokens when the machine costs usd_per_hour and sustains tok_per_s."""
    if usd_per_hour is None or not tok_per_s:
        return None
    return usd_per_hour / 3600.0 / tok_per_s * 1e6


def summarize(records: Sequence[RequestRecord], wall_s: float, slo: SLO = SLO(),
              usd_per_hour: float | None = None) -> RunMetrics:
    """Latency distributions and throughputs of one run (or of several reps' records pooled,
    with wall_s their summed wall time)."""
    ok = [r for r in records if r.ok]
    n_in = sum(r.num_input for r in ok)
    n_out = sum(r.n_out for r in ok)
    out_rate = rate(n_out, wall_s)
    good = [r for r in ok if slo.met(r)]
    prefill_time = union_length((r.sent, r.token_times[0]) for r in ok)
    decode_time = union_length((r.token_times[0], r.done) for r in ok if r.n_out > 1)
    during_loads = [g for r in ok for g in r.itls_during_loads]
    by_tier: dict[str, int] = {}
    for r in ok:
        for tier, n in r.cached_by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    return RunMetrics(
        ttft_ms=distribution_ms(r.ttft for r in ok),
        tpot_ms=distribution_ms(t for r in ok if (t := r.tpot) is not None),
        itl_ms=distribution_ms(g for r in ok for g in r.itls),
        e2e_ms=distribution_ms(r.e2e for r in ok),
        requests=len(ok), failed_requests=len(records) - len(ok), input_tokens=n_in, output_tokens=n_out,
        cached_tokens=sum(r.num_cached for r in ok), wall_s=wall_s,
        requests_per_s=rate(len(ok), wall_s), output_tok_per_s=out_rate, total_tok_per_s=rate(n_in + n_out, wall_s),
        prefill_tok_per_s_wall=rate(n_in, prefill_time),
        decode_tok_per_s_wall=rate(sum(r.n_out - 1 for r in ok if r.n_out > 1), decode_time),
        hit_rate=sum(r.num_cached for r in ok) / n_in if n_in else None,
        goodput_req_per_s=rate(len(good), wall_s) if slo.given else None,
        goodput_fraction=len(good) / len(ok) if slo.given and ok else None,
        usd_per_million_tokens=usd_per_million(usd_per_hour, out_rate),
        itl_during_loads_ms=distribution_ms(during_loads), itl_during_loads_samples=len(during_loads),
        cached_tokens_by_tier=by_tier,
    )


def spread(values: Sequence[float | None]) -> Spread:
    """min / median / max / relative spread of one figure across repetitions (rel_spread None below 2 reps)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return Spread()
    med = percentile(xs, 50)
    return Spread(xs[0], med, xs[-1], (xs[-1] - xs[0]) / med if med and len(xs) > 1 else None, len(xs))
