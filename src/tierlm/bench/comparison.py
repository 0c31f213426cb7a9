"""Comparisons: each configuration against the baseline on the same workload and arrival plan.

    memory_reduction = 1 - kv_bytes_per_session(config) / kv_bytes_per_session(baseline)
                       (KV referenced by running requests per running session, at the run's peak;
                       blocks shared through the prefix cache count once)
    speedup.prefill  = TTFT p50(baseline) / TTFT p50(config)     per-request prefill speed
    speedup.decode   = TPOT p50(baseline) / TPOT p50(config)     per-token decode speed
    speedup.e2e      = E2E p50(baseline)  / E2E p50(config)      whole-request speed

Ratios of medians, not of throughputs: at a fixed closed-loop concurrency throughput scales with
1/latency anyway, and a median shrugs off the stalls another process on a shared machine causes,
where a throughput over the wall time does not. The throughput ratios (prefill/decode/output tok/s)
are kept next to them as `throughput_ratio`. A ratio with a missing side is None (shown as n/a).
"""
from __future__ import annotations


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def compare_runs(runs: list[dict], baseline: str = "baseline") -> list[dict]:
    base = {(r["workload_spec"], r["arrival"]): r for r in runs if r["config"] == baseline}
    out = []
    for r in runs:
        b = base.get((r["workload_spec"], r["arrival"]))
        if b is None or r["config"] == baseline:
            continue
        m, bm = r["metrics"], b["metrics"]
        mem = _ratio(m.get("kv_bytes_per_session"), bm.get("kv_bytes_per_session"))
        out.append({
            "config": r["config"], "baseline": baseline, "workload": r["workload"],
            "workload_spec": r["workload_spec"], "shape": r["shape"], "concurrency": r["concurrency"],
            "arrival": r["arrival"],
            "memory_reduction": None if mem is None else 1.0 - mem,
            "speedup": {"prefill": _ratio(bm["ttft_ms"].get("p50"), m["ttft_ms"].get("p50")),
                        "decode": _ratio(bm["tpot_ms"].get("p50"), m["tpot_ms"].get("p50")),
                        "e2e": _ratio(bm["e2e_ms"].get("p50"), m["e2e_ms"].get("p50"))},
            "throughput_ratio": {"prefill": _ratio(m.get("prefill_tok_per_s"), bm.get("prefill_tok_per_s")),
                                 "decode": _ratio(m.get("decode_tok_per_s"), bm.get("decode_tok_per_s")),
                                 "e2e": _ratio(m.get("output_tok_per_s"), bm.get("output_tok_per_s"))},
            "incomplete": bool(r.get("incomplete") or b.get("incomplete")),
        })
    return out


def peer_ratios(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Phase rows side by side: tierlm tok/s, peer tok/s, and tierlm / peer."""
    by = {(r["phase"], r["batch"]): r for r in theirs}
    rows = []
    for r in ours:
        p = by.get((r["phase"], r["batch"]))
        rows.append({"phase": r["phase"], "batch": r["batch"], "shape": r["shape"], "tierlm_tok_per_s": r["tok_per_s"],
                     "peer_tok_per_s": p["tok_per_s"] if p else None,
                     "ratio": _ratio(r["tok_per_s"], p["tok_per_s"] if p else None)})
    return rows
