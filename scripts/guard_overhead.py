"""What the drift guard (engine/drift_guard.py) costs the serving path: paired A/B runs in one process of
the same KV format with the guard off and on.

    .venv/bin/python scripts/guard_overhead.py [--kv-format fp8_e4m3] [--fraction 0.1]
        [--workload fixed:n=32,isl=256,osl=64] [--pairs 4] [--concurrency 8] [--json out.json]

Each pair runs both engines back to back on the same workload, cold (reset_prefix_cache), in alternating
order (AB, BA, ...); the figure is the median over pairs of the ratio of output tokens/s (guarded / plain).
Every run's greedy tokens are diffed against the plain engine's: the guard only watches, so any difference is
a bug. Because pairs on a shared 2-core machine scatter by +-10%, the script also reports the guard's own
time, which does not depend on the noise: wall seconds of the top-k capture and submit on the engine thread,
and CPU seconds of the scoring worker (one intra-op thread at the lowest OS priority), as shares of the run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace

from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.configs import reference_config
from tierlm.bench.engine_driver import reset_prefix_cache, run_engine, warm_up
from tierlm.bench.metrics import summarize
from tierlm.bench.workloads import build_workload
from tierlm.args import parse_bytes
from tierlm.config import DriftGuardConfig
from tierlm.engine.llm_engine import LLMEngine

STEP_TOKENS = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-format", default="fp8_e4m3")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--workload", default="fixed:n=32,isl=256,osl=64")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    ref = reference_config(None, "auto", "auto", None, parse_bytes(a.kv_cache_memory), 64, STEP_TOKENS, 4096)
    ref = replace(ref, cache=replace(ref.cache, kv_format=a.kv_format))
    state = tempfile.mkdtemp(prefix="tierlm-guard-")
    guarded_cfg = replace(ref, drift_guard=DriftGuardConfig(fraction=a.fraction, state_path=f"{state}/rollback.json"))
    sides = {"plain": LLMEngine(ref), "guarded": LLMEngine(guarded_cfg)}
    guard = sides["guarded"].drift_guard
    try:
        w = build_workload(a.workload, sides["plain"].tokenizer, a.seed)
        warm = build_workload("fixed:n=4,isl=48,osl=8", sides["plain"].tokenizer, a.seed + 10_000)
        for eng in sides.values():
            warm_up(eng, warm.requests)
        guard.wait_idle(600)
        arrival = ArrivalPlan(concurrency=a.concurrency)
        pairs, mismatches, shares = [], 0, []
        for p in range(a.pairs):
            order = ["plain", "guarded"] if p % 2 == 0 else ["guarded", "plain"]
            got = {}
            for name in order:
                eng = sides[name]
                reset_prefix_cache(eng)
                c0 = dict(guard.counters)
                run = run_engine(eng, w.requests, arrival)
                if name == "guarded":
                    guard.wait_idle(600)  # scoring that outlives the run still counts against it below
                    c1 = guard.counters
                    shares.append({"wall_s": run.wall_s, **{k: c1[k] - c0[k] for k in
                                   ("engine_seconds", "worker_cpu_seconds", "scored_requests", "scored_tokens",
                                    "dropped_queue_full")}})
                got[name] = (summarize(run.records, run.wall_s).output_tok_per_s,
                             {r.index: r.token_ids for r in run.records})
            mismatches += sum(got["guarded"][1][i] != got["plain"][1][i] for i in got["plain"][1])
            ratio = got["guarded"][0] / got["plain"][0]
            s = shares[-1]
            pairs.append({"order": order, "plain_tok_s": got["plain"][0], "guarded_tok_s": got["guarded"][0],
                          "ratio": ratio})
            print(f"pair {p + 1} ({' then '.join(order)}): plain {got['plain'][0]:.2f} tok/s, guarded "
                  f"{got['guarded'][0]:.2f} tok/s, ratio {ratio:.3f}; scored {s['scored_requests']} requests "
                  f"({s['scored_tokens']} tokens, {s['dropped_queue_full']} dropped); capture on the engine thread "
                  f"{s['engine_seconds'] * 1e3:.1f} ms, worker CPU {s['worker_cpu_seconds']:.2f} s of "
                  f"{s['wall_s']:.1f} s", flush=True)
        ratios = [p["ratio"] for p in pairs]
        med = statistics.median(ratios)
        wall = sum(s["wall_s"] for s in shares)
        eng_share = sum(s["engine_seconds"] for s in shares) / wall
        worker_share = sum(s["worker_cpu_seconds"] for s in shares) / wall
        scored = sum(s["scored_tokens"] for s in shares)
        per_token = sum(s["worker_cpu_seconds"] for s in shares) / max(scored, 1)
        per_request = sum(s["worker_cpu_seconds"] for s in shares) / max(sum(s["scored_requests"] for s in shares), 1)
        st = guard.status()
        print(f"\n{w.spec}, {a.kv_format}, guard fraction {a.fraction}, concurrency {a.concurrency}: guarded / plain "
              f"output tok/s median {med:.3f} over {len(pairs)} pairs [{min(ratios):.3f}..{max(ratios):.3f}]; "
              f"greedy mismatches {mismatches}\nthe guard's own time: capture on the engine thread "
              f"{eng_share * 100:.3f}% of wall time; scoring worker {worker_share * 100:.2f}% of one core "
              f"({per_request:.2f} s CPU per scored request, {per_token * 1e3:.1f} ms per scored output token: the reference "
              f"prefills prompt and output); window KL {st['window']['kl_mean']}, top-1 "
              f"{st['window']['top1_agreement']}, tripped {st['tripped']}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"workload": w.spec, "kv_format": a.kv_format, "fraction": a.fraction, "pairs": pairs,
                           "median_ratio": med, "mismatches": mismatches, "guard": shares,
                           "engine_thread_fraction": eng_share, "worker_cpu_fraction": worker_share,
                           "worker_cpu_seconds_per_token": per_token,
                           "worker_cpu_seconds_per_request": per_request, "status": st}, f, indent=1)
    finally:
        for eng in sides.values():
            eng.close()


if __name__ == "__main__":
    main()
