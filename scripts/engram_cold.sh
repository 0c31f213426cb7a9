#!/usr/bin/env bash
# Where prefetch stops hiding the disk (docs/experiments.md, section 3b): a V4-mini with memory-mapped Engram tables of
# SIZE, served from a cold page cache (the engine drops the table file from it at start, so every row's first read
# goes to the disk). First the disk's random 4 KiB read latency on the cold file; then scripts/engram_prefetch_probe.py
# (per decode step: the time spent fetching rows and the part the forward pass waited for, per prefetch mode and
# batch size, a fresh cold engine each); then one `tierlm bench` run at batch 1 (each cold config's engine starts
# cold; its gate diffs greedy tokens against the baseline, tables on the device).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${DIR:-runs/engram-tables}
SIZE=${SIZE:-4GB}
OUT=${OUT:-docs/experiments}
mkdir -p "$OUT"
[ -d "$DIR/tables-$SIZE" ] || $PY scripts/engram_tables.py "$DIR" "$SIZE"
$PY - "$DIR/tables-$SIZE/engram.safetensors" > "$OUT/engram-cold-disk.txt" <<'PY'
import os, random, sys, time
from tierlm.memory.storage import drop_page_cache
path = sys.argv[1]
drop_page_cache(path)
size, fd, rng = os.path.getsize(path), os.open(path, os.O_RDONLY), random.Random(0)
lat = []
for _ in range(2000):
    off = rng.randrange(size // 4096) * 4096
    t = time.perf_counter(); os.pread(fd, 4096, off); lat.append(time.perf_counter() - t)
lat.sort()
print(f"random 4 KiB reads of a cold {size / 2**30:.1f} GiB file: p50 {lat[1000] * 1e6:.0f} us, "
      f"p90 {lat[1800] * 1e6:.0f} us, p99 {lat[1980] * 1e6:.0f} us, mean {sum(lat) / len(lat) * 1e6:.0f} us")
PY
cat "$OUT/engram-cold-disk.txt"
$PY scripts/engram_prefetch_probe.py "$DIR/tables-$SIZE" --batch 1 4 16 64 --osl 16 \
    --json "$OUT/engram-prefetch-$SIZE.json" | tee "$OUT/engram-prefetch.txt"
$PY -m tierlm.cli bench --model "$DIR/tables-$SIZE" \
    --configs engram-mmap engram-mmap-cold engram-mmap-cold-ahead engram-mmap-cold-step engram-mmap-cold-off \
    engram-off --workload fixed:n=8,isl=128,osl=32 --concurrency 1 --reps 1 --no-peer --no-plots \
    --out "$DIR/bench-cold-$SIZE" --json "$OUT/engram-cold-$SIZE.json"
$PY - "$OUT/engram-cold-$SIZE.json" <<'PY' | tee "$OUT/engram-cold.md"
import json, sys
doc = json.load(open(sys.argv[1]))
runs = {(r["config"], r["concurrency"]): r for r in doc["runs"]}
gates = {g["config"]: ("pass" if not g["flagged"] else "FLAGGED") for g in doc["gates"]}
configs = ["baseline", "engram-off", "engram-mmap", "engram-mmap-cold", "engram-mmap-cold-ahead", "engram-mmap-cold-step",
           "engram-mmap-cold-off"]
def rates(name, c):
    st = runs[(name, c)]["steps"]
    prefill = (st["prefill_tokens"] + st["mixed_tokens"]) / max(st["prefill_s"] + st["mixed_s"], 1e-9)
    return st["decode_tokens"] / st["decode_s"], prefill, runs[(name, c)]["metrics"]["ttft_ms"]["p50"]
print("| config | c | decode tok/s | x baseline | prefill tok/s | x baseline | TTFT p50 ms | gate |")
print("|---|---|---|---|---|---|---|---|")
for c in sorted({k[1] for k in runs}):
    bd, bp, _ = rates("baseline", c)
    for name in configs:
        d, p, ttft = rates(name, c)
        print(f"| {name} | {c} | {d:.1f} | {d / bd:.3f} | {p:.0f} | {p / bp:.3f} | {ttft:.0f} | {gates[name]} |")
PY
