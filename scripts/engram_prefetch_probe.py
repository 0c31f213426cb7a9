"""Where Engram prefetch stops hiding the table's latency (docs/experiments.md, section 3b).

For each prefetch mode (ahead, step, off) and batch size, a fresh engine serves a V4-mini whose tables are
memory-mapped from a cold page cache (EngineConfig.engram_cold_start: every row's first read goes to the disk) or a
warm one (--warm), runs `batch` requests to completion step by step, and reads the model's fetch_stats per decode
step: the time spent hashing and gathering rows (fetch) and the part the forward pass waited for (wait: the latency
prefetch did not hide; with prefetch off, all of it). Prompts are random ids drawn per (batch, rep), so each run's
rows are new to it.

    .venv/bin/python scripts/engram_prefetch_probe.py runs/engram-tables/tables-4GB --batch 1 4 16 64 \
        --json docs/experiments/engram-prefetch.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tierlm import LLM, SamplingParams
from tierlm.config import ENGRAM_PREFETCH_MODES, EngineConfig, SchedulerConfig


def run(model: str, mode: str, batch: int, isl: int, osl: int, cold: bool, seed: int) -> dict:
    cfg = EngineConfig(model=model, engram_backend="mmap", engram_prefetch=mode, engram_cold_start=cold,
                       scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(512, isl)))
    llm = LLM.from_config(cfg)
    engine, m = llm.engine, llm.engine.model
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=osl, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(3, 49152, (isl,), generator=g).tolist(), params)
    steps = []
    try:
        while engine.has_unfinished_requests():
            before = {i: dict(s) for i, s in m.fetch_stats().items()}
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            after = m.fetch_stats()
            s = engine.last_step
            if s is None:
                continue
            steps.append({"decode": s.decode_tokens, "prefill": s.prefill_tokens, "step_s": dt,
                          **{f"{k}_{i}": after[i][k] - before[i][k] for i in after for k in ("fetch_s", "wait_s")}})
    finally:
        engine.close()
    layers = list(m.engram_layers)
    dec = [x for x in steps if x["decode"] and not x["prefill"]]
    pre = [x for x in steps if x["prefill"]]

    def ms(rows, key):
        return 1e3 * statistics.mean(r[key] for r in rows) if rows else None
    return {"mode": mode, "batch": batch, "cold": cold, "layers": layers, "decode_steps": len(dec),
            "decode_step_ms": ms(dec, "step_s"), "decode_tok_per_s": sum(x["decode"] for x in dec) / sum(x["step_s"] for x in dec),
            "decode_batch": statistics.mean(x["decode"] for x in dec),
            **{f"decode_fetch_ms_{i}": ms(dec, f"fetch_s_{i}") for i in layers},
            **{f"decode_wait_ms_{i}": ms(dec, f"wait_s_{i}") for i in layers},
            "prefill_steps": len(pre), "prefill_tok_per_s": sum(x["prefill"] for x in pre) / sum(x["step_s"] for x in pre),
            "prefill_wait_ms": ms(pre, f"wait_s_{layers[0]}"), "prefill_fetch_ms": ms(pre, f"fetch_s_{layers[0]}")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--modes", nargs="+", default=list(ENGRAM_PREFETCH_MODES), choices=ENGRAM_PREFETCH_MODES)
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--osl", type=int, default=24)
    ap.add_argument("--warm", action="store_true", help="keep the page cache (default: a cold start per run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for batch in a.batch:
        for mode in a.modes:
            r = run(a.model, mode, batch, a.isl, a.osl, not a.warm, seed=batch)
            rows.append(r)
            lay = r["layers"]
            print(f"{mode:>5} batch {batch:>3} ({r['decode_batch']:.1f}): decode {r['decode_tok_per_s']:7.1f} tok/s, step {r['decode_step_ms']:6.1f} ms; "
                  + ", ".join(f"layer {i} fetch {r[f'decode_fetch_ms_{i}']:5.2f} / wait {r[f'decode_wait_ms_{i}']:5.2f} ms"
                              for i in lay)
                  + f"; prefill {r['prefill_tok_per_s']:6.0f} tok/s, wait {r['prefill_wait_ms']:.1f} of "
                    f"{r['prefill_fetch_ms']:.1f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
