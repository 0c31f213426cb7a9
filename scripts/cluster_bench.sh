#!/bin/bash
# Issue 16's routing benchmark on one machine: two 2-replica Ray Serve clusters (cache-aware and round-robin routing)
# and the single-process server, all driven by one `tierlm bench` run over HTTP (multi-turn chat, 16 users).
#   scripts/cluster_bench.sh [OUT_DIR] [WORKLOAD]
set -euo pipefail
OUT=${1:-cluster-bench}
WORKLOAD=${2:-multi-turn:users=16,rounds=3,sys=256,user=32,osl=32}
T=${TIERLM:-.venv/bin/tierlm}
mkdir -p "$OUT"
$T serve --replicas 2 --replica-threads 1 --routing cache --port 8301 --kv-cache-memory 256MiB --max-num-seqs 16 \
  > "$OUT/cache.log" 2>&1 &
A=$!
sleep 25  # two local Ray clusters: let the first settle before the second starts
$T serve --replicas 2 --replica-threads 1 --routing round_robin --port 8302 --kv-cache-memory 256MiB --max-num-seqs 16 \
  > "$OUT/round_robin.log" 2>&1 &
B=$!
$T serve --port 8303 --kv-cache-memory 512MiB --max-num-seqs 32 > "$OUT/single.log" 2>&1 &
C=$!
trap 'kill -TERM $A $B $C 2>/dev/null; wait' EXIT
for p in 8301 8302 8303; do
  for _ in $(seq 180); do curl -sf "localhost:$p/health" > /dev/null && break; sleep 1; done
done
# peers: 8301 = cache-aware replicas, 8302 = round-robin replicas, 8303 = one process at the same total threads
$T bench --workload "$WORKLOAD" --concurrency 16 --config baseline --reps 1 \
  --peer-url http://127.0.0.1:8301 --peer-url http://127.0.0.1:8302 --peer-url http://127.0.0.1:8303 \
  --out "$OUT/bench" --json "$OUT/bench.json"
