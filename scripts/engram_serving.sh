#!/usr/bin/env bash
# Serving with Engram tables on the device, in host memory and memory-mapped on disk (docs/experiments.md):
# V4-mini checkpoints with random tables of each size, then one `tierlm bench` run per size (baseline = tables on
# the device; engram-host; engram-mmap), decode tok/s at batch 1 and 16, greedy tokens gated against the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${DIR:-runs/engram-tables}
SIZES=${SIZES:-"10MB 1GB 4GB"}
OUT=${OUT:-docs/experiments}
mkdir -p "$OUT"
$PY scripts/engram_tables.py "$DIR" $SIZES
for size in $SIZES; do
  $PY -m tierlm.cli bench --model "$DIR/tables-$size" --configs engram-host engram-mmap \
      --workload fixed:n=16,isl=128,osl=32 --concurrency 1 16 --reps 2 --no-peer --no-plots \
      --out "$DIR/bench-$size" --json "$OUT/engram-serving-$size.json"
done
$PY - "$OUT" $SIZES <<'PY'
import json, sys
out, sizes = sys.argv[1], sys.argv[2:]
rows = ["| tables | c | device decode tok/s | host / device | mmap / device | gate |", "|---|---|---|---|---|---|"]
for size in sizes:
    doc = json.load(open(f"{out}/engram-serving-{size}.json"))
    runs = {(r["config"], r["concurrency"]): r for r in doc["runs"]}
    cmp = {(c["config"], c["concurrency"]): c for c in doc["comparisons"]}
    gate = "pass" if not any(g["flagged"] for g in doc["gates"]) else "FLAGGED"
    for c in sorted({k[1] for k in runs}):
        reps = [r["decode_tok_per_s"] for r in runs[("baseline", c)]["per_rep"] if r["decode_tok_per_s"]]
        base = sum(reps) / len(reps)
        x = lambda n: cmp[(n, c)]["decode_x"]
        f = lambda r: f"{r['value']:.3f} ({r['lo']:.3f}-{r['hi']:.3f})"
        rows.append(f"| {size} | {c} | {base:.1f} | {f(x('engram-host'))} | {f(x('engram-mmap'))} | {gate} |")
open(f"{out}/engram-serving.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
