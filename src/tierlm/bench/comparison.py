"""Comparisons: each run against its reference run on the same workload and arrival plan.

The reference of an in-process configuration is the baseline (the reference config); the reference of an
HTTP peer is `tierlm serve` driven by the same HTTP driver (never the in-process engine: the server's
own overhead would flatter the peer).

    ttft_x   = TTFT p50(reference) / TTFT p50(config)           per-request time to first token
    tpot_x   = TPOT p50(reference) / TPOT p50(config)           per-request time per output token
                                                                  (includes waiting behind prefills)
    e2e_x    = E2E p50(reference)  / E2E p50(config)            whole-request latency
    decode_x = decode tok/s(config) / decode tok/s(reference)   decode compute speed: tokens / seconds of
                                                                  decode-only engine steps (in-process), or
                                                                  the wall-clock decode rate (HTTP)
    output_x = output tok/s(config) / output tok/s(reference)   end-to-end throughput over the wall time
    kv_per_session_ratio = KV bytes per session(config) / (reference), at each run's peak

Each ratio carries the min and max of its per-repetition ratios (rep i of the config against rep i of the
reference). The configs' runs are minutes apart, not interleaved, so this shows how much the ratio moves
from repetition to repetition, not a bound on noise; `python -m tierlm.bench.perf` alternates the sides rep
by rep for a paired figure. Latency ratios are ratios of medians, which shrug off the stalls another
process on a shared machine causes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tierlm.bench.configs import BASELINE
from tierlm.bench.results import Comparison, Ratio, RepFigures, RunResult

SERVE = "http:tierlm-serve"  # the name of `tierlm serve`'s runs, the reference of HTTP peers


def _div(a, b) -> float | None:
    return a / b if a is not None and b else None


class Fig(NamedTuple):
    """A figure read from a run (pooled over its repetitions) and from one repetition."""

    pooled: Callable[[RunResult], float | None]
    rep: Callable[[RepFigures], float | None]


def _ratio(run: RunResult, ref: RunResult, fig: Fig, inverse: bool) -> Ratio:
    """run / ref of the figure (ref / run for latencies, `inverse`), pooled and per paired repetition."""
    def one(x, y):
        return _div(y, x) if inverse else _div(x, y)

    per = [v for a, b in zip(run.per_rep, ref.per_rep) if (v := one(fig.rep(a), fig.rep(b))) is not None]
    return Ratio(one(fig.pooled(run), fig.pooled(ref)), min(per, default=None), max(per, default=None))


TTFT = Fig(lambda r: r.metrics.ttft_ms.p50, lambda p: p.ttft_p50_ms)
TPOT = Fig(lambda r: r.metrics.tpot_ms.p50, lambda p: p.tpot_p50_ms)
E2E = Fig(lambda r: r.metrics.e2e_ms.p50, lambda p: p.e2e_p50_ms)
DECODE = Fig(lambda r: r.steps.decode_tok_per_s if r.steps else r.metrics.decode_tok_per_s_wall,
              lambda p: p.decode_tok_per_s)
OUTPUT = Fig(lambda r: r.metrics.output_tok_per_s, lambda p: p.output_tok_per_s)


def reference_of(run: RunResult) -> str | None:
    if run.driver == "http":
        return None if run.config == SERVE else SERVE
    return None if run.config == BASELINE else BASELINE


def compare_runs(runs: list[RunResult]) -> list[Comparison]:
    by_key = {(r.config, r.workload_spec, r.arrival): r for r in runs}
    out = []
    for r in runs:
        ref_name = reference_of(r)
        ref = by_key.get((ref_name, r.workload_spec, r.arrival)) if ref_name else None
        if ref is None:
            continue
        m, rm = r.memory, ref.memory
        out.append(Comparison(
            config=r.config, reference=ref_name, workload=r.workload, workload_spec=r.workload_spec, shape=r.shape,
            concurrency=r.concurrency, arrival=r.arrival,
            ttft_x=_ratio(r, ref, TTFT, inverse=True), tpot_x=_ratio(r, ref, TPOT, inverse=True),
            e2e_x=_ratio(r, ref, E2E, inverse=True), decode_x=_ratio(r, ref, DECODE, inverse=False),
            output_x=_ratio(r, ref, OUTPUT, inverse=False),
            kv_per_session_ratio=_div(m.kv_bytes_per_session, rm.kv_bytes_per_session),
            peak_kv_ratio=_div(m.peak_kv_bytes, rm.peak_kv_bytes),
            incomplete=r.incomplete or ref.incomplete))
    return out
