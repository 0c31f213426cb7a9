"""What the KV-tier machinery costs when nothing is reused: the "< 3% throughput loss on a workload with no
reuse" target of the KV-tier work, measured as paired A/B runs in one process.

    .venv/bin/python scripts/tier_overhead.py [--workload fixed:n=8,isl=1024,osl=32] [--pairs 4]
                                              [--concurrency 4] [--kv-cache-memory 96MiB] [--json out.json]

Two engines are built from the bench's own configs (bench/configs.py) on the same reference: `device-only`
(prefix cache + chunked prefill, evicted blocks are dropped) and `tiers` (the same plus host memory and a
disk directory below the device pool, write-back). The workload has no reuse, so every block the pool
evicts is demoted to host and then to disk and never read back: the tiers side pays for gathering,
encoding, checksumming and writing every evicted block and gets nothing for it. Each pair runs both sides
back to back, cold (bench's reset_prefix_cache), in alternating order (AB, BA, ...) so drift in the
machine's speed falls on both sides; the figure is the median over pairs of the per-pair ratio of output
tokens/s (tiers / device-only), with the per-pair ratios beside it. The tiers side's traffic (blocks
demoted, bytes stored per tier) shows the machinery ran, and every run's greedy tokens are diffed against
device-only's: a faster wrong answer is a bug. Because pairs on a shared 2-core machine scatter by +-10%,
the script also reports the machinery's own time, which does not depend on the noise: wall seconds inside
the tier verbs the engine thread calls (ControllerStats.engine_seconds) as a share of the run, and the CPU
seconds of the writer and loader threads (which compete with compute for the cores).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile

from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.configs import engine_config, reference_config
from tierlm.bench.engine_driver import release_tiers, reset_prefix_cache, run_engine, warm_up
from tierlm.bench.metrics import summarize
from tierlm.bench.workloads import build_workload
from tierlm.args import parse_bytes
from tierlm.config import TierConfig
from tierlm.engine.llm_engine import LLMEngine

STEP_TOKENS = 512
COST = ("engine_seconds", "loader_cpu_seconds", "writer_cpu_seconds")  # ControllerStats: where the time goes  # the bench's default step budget for chunking configs


def reference(kv: int, longest: int):
    return reference_config(None, "auto", "auto", None, kv, 64, STEP_TOKENS, longest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="fixed:n=8,isl=1024,osl=32")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kv-cache-memory", default="96MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    kv = parse_bytes(a.kv_cache_memory)
    disk = tempfile.mkdtemp(prefix="tierlm-overhead-")
    sides: dict[str, LLMEngine] = {}
    try:
        sides["device-only"] = LLMEngine(engine_config("device-only", reference(kv, STEP_TOKENS), STEP_TOKENS))
        w = build_workload(a.workload, sides["device-only"].tokenizer, a.seed)
        ref = reference(kv, w.max_prompt_len)
        tiers = TierConfig(host_memory_bytes=4 * kv, disk_dir=disk)
        sides["tiers"] = LLMEngine(engine_config("tiers", ref, STEP_TOKENS, tiers))
        warm = build_workload("fixed:n=4,isl=48,osl=8", sides["tiers"].tokenizer, a.seed + 10_000)
        for eng in sides.values():
            warm_up(eng, warm.requests)
        arrival = ArrivalPlan(concurrency=a.concurrency)
        pairs, mismatches, traffic = [], 0, []
        cost0 = {k: getattr(sides["tiers"].tiers.stats, k) for k in COST}
        for p in range(a.pairs):
            order = ["device-only", "tiers"] if p % 2 == 0 else ["tiers", "device-only"]
            got = {}
            for name in order:
                eng = sides[name]
                reset_prefix_cache(eng)
                run = run_engine(eng, w.requests, arrival)
                m = summarize(run.records, run.wall_s)
                got[name] = (m.output_tok_per_s, {r.index: r.token_ids for r in run.records}, run)
            base_tokens = got["device-only"][1]
            mismatches += sum(got["tiers"][1][i] != base_tokens[i] for i in base_tokens)
            t = got["tiers"][2].tiers
            wall = got["tiers"][2].wall_s
            cost = {k: getattr(sides["tiers"].tiers.stats, k) - cost0[k] for k in cost0}
            cost0 = {k: getattr(sides["tiers"].tiers.stats, k) for k in cost0}
            traffic.append({"demoted_blocks": t.demoted_blocks, "bytes_stored": t.bytes_stored,
                            "bytes_loaded": t.bytes_loaded, "dropped_writes": t.dropped_writes,
                            "evictions": got["tiers"][2].evictions, "wall_s": wall, **cost})
            ratio = got["tiers"][0] / got["device-only"][0]
            pairs.append({"order": order, "device_only_tok_s": got["device-only"][0], "tiers_tok_s": got["tiers"][0],
                          "ratio": ratio})
            print(f"pair {p + 1} ({' then '.join(order)}): device-only {got['device-only'][0]:.2f} tok/s, "
                  f"tiers {got['tiers'][0]:.2f} tok/s, ratio {ratio:.3f}; tiers demoted {t.demoted_blocks} blocks, "
                  f"stored host {t.bytes_stored.get('host', 0) / 2**20:.0f} MiB, disk "
                  f"{t.bytes_stored.get('disk', 0) / 2**20:.0f} MiB; tier verbs on the engine thread "
                  f"{cost['engine_seconds']:.2f} s ({cost['engine_seconds'] / wall * 100:.2f}% of {wall:.1f} s), "
                  f"writer CPU {cost['writer_cpu_seconds']:.2f} s, loader CPU {cost['loader_cpu_seconds']:.2f} s",
                  flush=True)
        ratios = [p["ratio"] for p in pairs]
        eng = sum(t["engine_seconds"] for t in traffic) / sum(t["wall_s"] for t in traffic)
        bg = sum(t["writer_cpu_seconds"] + t["loader_cpu_seconds"] for t in traffic) / sum(t["wall_s"] for t in traffic)
        med = statistics.median(ratios)
        print(f"\n{w.spec} at concurrency {a.concurrency}, pool {a.kv_cache_memory}: tiers / device-only output "
              f"tok/s median {med:.3f} ({(1 - med) * 100:+.1f}% loss) over {len(pairs)} pairs "
              f"[{min(ratios):.3f}..{max(ratios):.3f}]; greedy mismatches {mismatches}\n"
              f"the machinery's own time on the tiers side: tier verbs on the engine thread {eng * 100:.2f}% of wall "
              f"time; writer + loader threads {bg * 100:.2f}% of one core over the run")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"workload": w.spec, "concurrency": a.concurrency, "kv_cache_memory": kv, "pairs": pairs,
                           "median_ratio": med, "mismatches": mismatches, "tiers_traffic": traffic,
                           "engine_thread_fraction": eng, "background_cpu_fraction": bg}, f, indent=1)
    finally:
        for eng in sides.values():
            release_tiers(eng)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
