#!/usr/bin/env bash
# The GPU check: one script, run from the repository root on the device machine (one H200, Python 3.12 +
# torch/transformers preinstalled, no internet, no default model). Everything it prints goes to
# $OUT/device_check.log; perf results to $OUT/perf_*.json; test results to $OUT/*.xml.
# A failing step is recorded and the next one still runs; each step has its own time limit, so a hang
# costs that step only, and what the log holds so far is already in $OUT. Expected wall time on an
# H200: not yet measured (planned ~8-10 minutes: the device tests, then the ~1B scale steps); each step has a limit.
#
#   bash scripts/device_check.sh                      # on the GPU machine ($OUT is set there)
#   DEVICE=cpu QUICK=1 PY=.venv/bin/python OUT=/tmp/dc bash scripts/device_check.sh   # local dry run
#   (SCALE_ONLY=1: only the GPU-scale steps, 3.; BIG=1: also the ~8B model; SMOL=1: also the 135M-shape runs, 2.)
#
# Needs, next to the working tree: .whl/ (pure-Python wheels of packages tierlm pins that the machine
# lacks: platformdirs, gguf; unpacked into a private dir, no pip, no index) and .devcheck/smollm2_shape/
# (config.json + tokenizer files of the default model's converted cache entry, without its weights):
# the speed runs use seeded random weights in exactly that shape (tests/helpers/random_model.py).
# Prepare both once, here, from the repository root (both are git-ignored via .git/info/exclude):
#   printf '/.whl/\n/.devcheck/\n' >> .git/info/exclude
#   d=$(.venv/bin/python -c 'from tierlm.models.loader import load_checkpoint; print(load_checkpoint(None).path)')
#   mkdir -p .devcheck/smollm2_shape && cp "$d"/{config.json,tokenizer.json,tokenizer_config.json} .devcheck/smollm2_shape/
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       platformdirs==4.5.1 gguf==0.19.0
# then run it through the device tool with carry [".whl", ".devcheck"].
set -uo pipefail

OUT="${OUT:-$PWD/device-out}"
DEVICE="${DEVICE:-cuda}"
if [ -z "${PY:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3; else PY=python3; fi
fi
QUICK="${QUICK:-0}"
SITE="${SITE:-/tmp/tierlm-site}"
MODEL_DIR="${MODEL_DIR:-/tmp/smol-random}"
SHAPE_DIR="${SHAPE_DIR:-.devcheck/smollm2_shape}"
mkdir -p "$OUT" "$SITE"

export PYTHONUNBUFFERED=1
export TIERLM_CACHE_DIR="${TIERLM_CACHE_DIR:-/tmp/tierlm-cache}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$SITE:$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"

T0=$(date +%s)
LAST_RC=0
declare -a SUMMARY=()
step() {  # step NAME LIMIT_S CMD... : run with a time limit, log its status and duration
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  echo; echo "=== [$(( s - T0 ))s] $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local d=$(( $(date +%s) - s ))
  echo "=== $name: rc=$rc in ${d}s"
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$d")")
  LAST_RC=$rc
  return 0
}

main() {
echo "=== device check $(date -u +%FT%TZ) on $(hostname), device=$DEVICE quick=$QUICK"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
fi
"$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for m in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "jinja2", "accelerate", "pytest",
          "hypothesis", "gguf", "platformdirs", "tqdm"):
    try:
        print(f"  {m:13s}", getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(f"  {m:13s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda,
      "| devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF

# Missing pure-Python packages: unpack the carried wheels (a wheel of pure Python is an importable zip).
step unpack-wheels 30 "$PY" -c '
import glob, sys, zipfile
whls = sorted(glob.glob(".whl/*.whl"))
for w in whls:
    zipfile.ZipFile(w).extractall(sys.argv[1])
print("unpacked", [w.split("/")[-1] for w in whls], "into", sys.argv[1])' "$SITE"

step imports 60 "$PY" -c '
import tierlm, tierlm.engine, tierlm.bench.perf, tierlm.models.loader
print("tierlm", tierlm.__version__, "from", tierlm.__file__)
import platformdirs, gguf  # lazy in tierlm (cache dir without $TIERLM_CACHE_DIR; GGUF files): not on this path
print("platformdirs", platformdirs.__version__, "gguf from", gguf.__file__)'

if [ "${SCALE_ONLY:-0}" != 1 ]; then
# 1. Engine behaviour on the device (tiny random models; no default model needed): parity with CPU and transformers,
#    host-tier loads through the load stream, the Triton decode kernel against the torch backend (every KV format,
#    split-KV, sparse tables), and captured decode steps (real CUDA graphs) against eager.
step test-cuda 180 env TIERLM_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  tests/engine/test_cuda.py tests/engine/test_captured_decode.py tests/attention/test_triton_attention.py \
  --durations=8 --junitxml="$OUT/test_cuda.xml"

# 2. Speed: random weights in SmolLM2-135M's exact shape, tierlm vs transformers on the same device (measured in the
#    fifth session; SMOL=1 runs it again).
if [ "${SMOL:-0}" = 1 ]; then
step random-model 60 "$PY" tests/helpers/random_model.py "$MODEL_DIR" --like "$SHAPE_DIR" --seed 0
if [ "$QUICK" = 1 ]; then
  PERF_ARGS=(--batch 1 4 --new-tokens 8 --reps 1 --prefill-len 64)
else
  PERF_ARGS=(--batch 1 16 64 --new-tokens 128 --reps 3 --prefill-len 512)
fi
for dt in bf16 fp32; do
  step "perf-$DEVICE-$dt" 120 "$PY" -m tierlm.bench.perf --model "$MODEL_DIR" --device "$DEVICE" --dtype "$dt" \
    "${PERF_ARGS[@]}" --progress --json "$OUT/perf_${DEVICE}_${dt}.json"
  if [ "$LAST_RC" != 0 ] && [ "$LAST_RC" != 124 ] && [ "$LAST_RC" != 137 ]; then  # failed, not slow:
    step "perf-$DEVICE-$dt-nopeer" 60 "$PY" -m tierlm.bench.perf --model "$MODEL_DIR" --device "$DEVICE" \
      --dtype "$dt" "${PERF_ARGS[@]}" --no-peer --progress --json "$OUT/perf_${DEVICE}_${dt}_nopeer.json"
  fi
done
fi  # SMOL

fi  # SCALE_ONLY

# 3. GPU scale (issue 17): a ~1B Llama with random weights (bf16 on disk), captured vs eager decode (Triton attention)
#    and transformers eager at batch 1..256, then dense bf16 vs FP8 KV vs FP8 + Quest sparse at long contexts.
#    BIG=1 adds the ~8B shape (15 GB of weights to write: a few minutes).
if [ "$QUICK" = 1 ]; then
  B1_ARGS=(--batch 1 4 --new-tokens 8 --reps 1 --prefill-len 256 --prompt-len 32)
  LONG_CTX=(512); LONG_ARGS=(--batch 1 --new-tokens 8 --reps 1 --prefill-len 64); SPARSE=256
else
  B1_ARGS=(--batch 1 16 64 256 --new-tokens 128 --reps 2 --prefill-len 2048 8192 --prompt-len 128)
  LONG_CTX=(32000 8192); LONG_ARGS=(--batch 1 4 --new-tokens 64 --reps 2 --prefill-len 2048); SPARSE=2048
fi
# The Triton backend on a CPU runs under Triton's interpreter (~0.5 tok/s for 1B): a CPU dry run uses torch.
SCALE_BACKEND=triton; [ "$DEVICE" = cpu ] && SCALE_BACKEND=torch
for size in 1b $([ "${BIG:-0}" = 1 ] && echo 8b); do
  dir="/tmp/llama-$size"
  step "random-$size" 300 "$PY" tests/helpers/random_model.py "$dir" --like "$SHAPE_DIR" --shape "llama-$size" \
    --dtype bf16 --seed 0
  step "perf-$size-captured" 300 "$PY" -m tierlm.bench.perf --model "$dir" --device "$DEVICE" --dtype bf16 \
    --attention-backend $SCALE_BACKEND --variant eager:enforce_eager=1 --variant torch-eager:attention_backend=torch,enforce_eager=1 \
    "${B1_ARGS[@]}" --progress --json "$OUT/perf_${size}_captured.json"
  for ctx in "${LONG_CTX[@]}"; do
    step "perf-$size-ctx$ctx" 300 "$PY" -m tierlm.bench.perf --model "$dir" --device "$DEVICE" --dtype bf16 \
      --attention-backend $SCALE_BACKEND --prompt-len "$ctx" --no-peer --no-reference \
      --variant fp8:kv_format=fp8_e4m3 --variant fp8-sparse:kv_format=fp8_e4m3,sparse_budget=$SPARSE \
      "${LONG_ARGS[@]}" --progress --json "$OUT/perf_${size}_ctx${ctx}.json"
  done
  rm -rf "$dir"
done

# 4. The device-independent suites under this machine's torch (CPU; no default model needed).
step cpu-suites 120 "$PY" -m pytest -q -p no:cacheprovider -x tests/attention tests/kvcache tests/scheduler \
  tests/engine/test_sampler.py --junitxml="$OUT/cpu_suites.xml"

echo; echo "=== summary ($(( $(date +%s) - T0 ))s in all)"
printf '  %s\n' "${SUMMARY[@]}"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=memory.used --format=csv; fi
}

main 2>&1 | tee -a "$OUT/device_check.log"
