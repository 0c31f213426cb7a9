"""Latency and throughput metrics from request timelines. Pure arithmetic, no engine.

Definitions (REFERENCE.md section 6; all times in seconds on one monotonic clock):

    TTFT  = first_token - sent            (sent: the scheduled arrival in open loop)
    E2E   = done - sent
    TPOT  = (E2E - TTFT) / (n_out - 1)     requests with one output token have none
    ITL   = gaps between consecutive token arrivals of one request, pooled over requests
    requests/s, output tok/s, total tok/s: completed requests and their tokens over the wall time
    prefill tok/s = input tokens / time some request was waiting for its first token
    decode tok/s  = (output tokens - one per request) / time some request was decoding
                    (both "time" figures are the length of the union of the per-request intervals,
                    so overlap under load is counted once)
    goodput = completed requests meeting every SLO given, per second (and as a fraction)

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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """{p50, p90, p99} in milliseconds (plus mean) of values given in seconds."""
    xs = [v * 1e3 for v in values_s]
    out: dict[str, float | None] = {f"p{q}": percentile(xs, q) for q in PERCENTILES}
    out["mean"] = sum(xs) / len(xs) if xs else None
    return out


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


def _rate(num: float, seconds: float) -> float | None:
    return num / seconds if seconds > 0 else None


def hit_rate_delta(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Hit rate over a run from (queries, hits) token counters read before and after; None if no query."""
    queries, hits = after[0] - before[0], after[1] - before[1]
    return hits / queries if queries > 0 else None


def usd_per_million(usd_per_hour: float | None, tok_per_s: float | None) -> float | None:
    """$ per 1M tokens when the machine costs usd_per_hour and sustains tok_per_s."""
    if usd_per_hour is None or not tok_per_s:
        return None
    return usd_per_hour / 3600.0 / tok_per_s * 1e6


def summarize(records: Sequence[RequestRecord], wall_s: float, slo: SLO = SLO(),
              usd_per_hour: float | None = None) -> dict:
    """Latency distributions and throughputs of one run (or of several reps' records pooled,
    with wall_s their summed wall time)."""
    ok = [r for r in records if r.ok]
    n_in = sum(r.num_input for r in ok)
    n_out = sum(r.n_out for r in ok)
    out_rate = _rate(n_out, wall_s)
    good = [r for r in ok if slo.met(r)]
    prefill_time = union_length((r.sent, r.token_times[0]) for r in ok)
    decode_time = union_length((r.token_times[0], r.done) for r in ok if r.n_out > 1)
    return {
        "ttft_ms": distribution_ms(r.ttft for r in ok),
        "tpot_ms": distribution_ms(t for r in ok if (t := r.tpot) is not None),
        "itl_ms": distribution_ms(g for r in ok for g in r.itls),
        "e2e_ms": distribution_ms(r.e2e for r in ok),
        "requests": len(ok),
        "failed_requests": len(records) - len(ok),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "cached_tokens": sum(r.num_cached for r in ok),
        "wall_s": wall_s,
        "requests_per_s": _rate(len(ok), wall_s),
        "output_tok_per_s": out_rate,
        "total_tok_per_s": _rate(n_in + n_out, wall_s),
        "prefill_tok_per_s": _rate(n_in, prefill_time),
        "decode_tok_per_s": _rate(sum(r.n_out - 1 for r in ok if r.n_out > 1), decode_time),
        "goodput_req_per_s": _rate(len(good), wall_s) if slo.given else None,
        "goodput_fraction": len(good) / len(ok) if slo.given and ok else None,
        "usd_per_million_tokens": usd_per_million(usd_per_hour, out_rate),
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """min / median / max / relative spread of one figure across repetitions (spread None below 2 reps)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"min": None, "median": None, "max": None, "rel_spread": None, "reps": 0}
    med = percentile(xs, 50)
    return {"min": xs[0], "median": med, "max": xs[-1],
            "rel_spread": (xs[-1] - xs[0]) / med if med and len(xs) > 1 else None, "reps": len(xs)}
