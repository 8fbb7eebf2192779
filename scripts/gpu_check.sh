#!/usr/bin/env bash
# One prepared check for a lent GPU machine (torch 2.11 + CUDA 13, H200, no package registry).
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # about 6-8 minutes; every step has its own timeout
#
#   GPU_CHECK_BUDGET (default 450 s) caps the whole script.
# 0. installs the wheels carried in .whl/ (faiss-cpu, vector-quantize-pytorch and its needs) under /tmp/site;
# 1. builds the extension against the machine's torch (QUANTKIT_CUDA=1, sm_90 only to keep it short);
# 2. runs the CUDA tests (tests/test_cuda.py, `-m cuda`) and the build tests (tests/test_build.py);
# 3. scripts/gpu_timing.py: nearest_codeword exact / fast mode against torch matmul + argmin, torch.cdist and
#    vector-quantize-pytorch on the issue's six shapes (time, peak memory, agreement with a float64 argmin);
# 4. benchmarks/bench_quantizers.py --device cuda: training steps against vector-quantize-pytorch.
# Everything it prints goes to $OUT/gpu_check.log, each step also to its own log under $OUT/logs, packed into
# $OUT/logs.tar.gz at the end; a summary line per step. It never stops at a failed step: the later steps still
# tell something. `bash scripts/gpu_check.sh` with GPU_CHECK_NEAREST_BENCH=1 also runs bench_nearest on the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
LOGS=$OUT/logs  # every step's log and result file, packed into $OUT/logs.tar.gz at the end (8 files come back)
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -a SUMMARY=()
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for the whole script; each step gets at most what is left
step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a timeout, logs to $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then SUMMARY+=("$name: skipped, budget spent"); echo "== $name: skipped"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.log"
  SUMMARY+=("$name: rc=$rc in $((SECONDS - start))s")
  echo "== $name: rc=$rc in $((SECONDS - start))s"
}

if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (faiss-cpu, vector-quantize-pytorch and its needs)
  step wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step env 60 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; nvcc --version || ls /usr/local/cuda*/bin/nvcc"

export QUANTKIT_CUDA=1 QUANTKIT_CUDA_ARCHS=${QUANTKIT_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-8}
step build 240 $PY -m pip install --no-build-isolation --no-deps -v -e .
if ! ls quantkit/_C*.so > /dev/null 2>&1; then  # pip without PEP 660 support, or the build failed: plain setup.py
  step build_inplace 240 $PY setup.py build_ext --inplace
fi
step info 60 $PY -m quantkit info

export QUANTKIT_EXPECT_CUDA_KERNELS=1 QUANTKIT_EXPECT_EXT=1 HYPOTHESIS_PROFILE=ci
step test_cuda 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rfE --durations=15 \
  --junitxml="$LOGS/test_cuda.xml"
step test_build 90 $PY -m pytest -q -p no:cacheprovider tests/test_build.py -rfE

step timing 120 env OUT="$LOGS" $PY scripts/gpu_timing.py
step bench_quantizers 130 $PY benchmarks/bench_quantizers.py --device cuda --warmup 1 --repeats 3 --out "$LOGS"
if [[ ${GPU_CHECK_NEAREST_BENCH:-0} == 1 ]]; then
  step bench_nearest 150 $PY benchmarks/bench_nearest.py --methods faiss cuda_mm quantkit_cuda --threads 16 \
    --stem nearest_cuda
fi

cp benchmarks/results/nearest_cuda.* "$LOGS"/ 2> /dev/null
echo "== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
cp "$LOGS"/timing.json "$LOGS"/bench_quantizers.md "$OUT"/ 2> /dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"  # at most 8 files come back from the device
