"""The training experiments' report: a Markdown table and validation-loss plots from runs/exp/*/ (summary.json,
log.jsonl), written under docs/experiments/. Usage: experiments_report.py RUNS_DIR OUT_DIR"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from tierlm.train.plots import compare_plot


def load(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    vals = [(r["tokens"], r["val_loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "val_loss" in r]
    return summary, vals


def main(runs: str, out: str) -> int:
    runs_dir, out_dir = Path(runs), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    got = {p.name: load(p) for p in sorted(runs_dir.iterdir()) if (p / "summary.json").exists()}
    lines = ["| run | params (backbone + Engram layers) | table values | tokens | val loss | val ppl | train tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name, (s, _) in got.items():
        lines.append(f"| {name} | {s['params']:,} | {s['table_params']:,} | {s['tokens']:,} | {s['val_loss']:.4f} | "
                     f"{s['val_ppl']:.2f} | {s['tokens_per_s']:,.0f} |")
    seeds = sorted({n.rsplit('-s', 1)[1] for n in got if n.startswith("v4mini-")})
    gains = [got[f"llama-s{k}"][0]["val_loss"] - got[f"v4mini-s{k}"][0]["val_loss"] for k in seeds
             if f"llama-s{k}" in got]
    if gains:
        spread = f" (seeds: {', '.join(f'{g:+.4f}' for g in gains)}" + \
                 (f"; sd {statistics.stdev(gains):.4f})" if len(gains) > 1 else ")")
        mean = statistics.mean(gains)
        lines.append(f"\nEngram gain in validation loss (no-Engram minus Engram, positive = Engram better): "
                     f"{mean:+.4f} nats{spread}; perplexity ratio {math.exp(mean):.3f}x")
    cur = [got[f"uniform-s{k}"][0]["val_loss"] - got[f"llama-s{k}"][0]["val_loss"]
           for k in sorted({n.rsplit('-s', 1)[1] for n in got if n.startswith("uniform-")}) if f"llama-s{k}" in got]
    if cur:
        spread = f" (seeds: {', '.join(f'{g:+.4f}' for g in cur)}" + \
                 (f"; sd {statistics.stdev(cur):.4f})" if len(cur) > 1 else ")")
        lines.append(f"\nCurriculum gain at equal tokens (uniform minus curriculum, by length): "
                     f"{statistics.mean(cur):+.4f} nats{spread}")
    if "reference-s0" in got and "uniform-s0" in got:
        d = got["uniform-s0"][0]["val_loss"] - got["reference-s0"][0]["val_loss"]
        lines.append(f"\nCurriculum by reference-model loss, gain over uniform (seed 0): {d:+.4f} nats")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    compare_plot({n: v for n, (_, v) in got.items() if n.startswith(("llama-s", "v4mini-s"))},
                 out_dir / "engram.png", "Engram vs no Engram: validation loss")
    if "uniform-s0" in got:
        curves = {"curriculum by length (easy to hard)": got["llama-s0"][1], "uniform": got["uniform-s0"][1]}
        if "reference-s0" in got:
            curves["curriculum by reference-model loss"] = got["reference-s0"][1]
        compare_plot(curves, out_dir / "curriculum.png", "Curriculum vs uniform sampling: validation loss (seed 0)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
