#!/usr/bin/env bash
# One prepared check for a lent GPU machine (torch 2.11 + CUDA 13, H200, no package registry).
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # about 5-8 minutes; every step has its own timeout
#
#   GPU_CHECK_BUDGET (default 470 s) caps the whole script.
# 1. builds the extension against the machine's torch (QUANTKIT_CUDA=1, sm_90 only to keep it short);
# 2. runs the CUDA tests (tests/test_cuda.py, `-m cuda`) and the build tests (tests/test_build.py);
# 3. times nearest_codeword exact / fast mode against a chunked torch matmul + argmin on the issue's shapes;
# 4. runs benchmarks/bench_nearest.py --device cuda.
# Everything it prints goes to $OUT/gpu_check.log, each step also to its own log; a summary line per step at the
# end. It never stops at a failed step: the later steps still tell something.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -a SUMMARY=()
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for the whole script; each step gets at most what is left
step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a timeout, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then SUMMARY+=("$name: skipped, budget spent"); echo "== $name: skipped"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  SUMMARY+=("$name: rc=$rc in $((SECONDS - start))s")
  echo "== $name: rc=$rc in $((SECONDS - start))s"
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; nvcc --version || ls /usr/local/cuda*/bin/nvcc"

export QUANTKIT_CUDA=1 QUANTKIT_CUDA_ARCHS=${QUANTKIT_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-8}
step build 300 $PY -m pip install --no-build-isolation --no-deps -v -e .
if ! ls quantkit/_C*.so > /dev/null 2>&1; then  # pip without PEP 660 support, or the build failed: plain setup.py
  step build_inplace 240 $PY setup.py build_ext --inplace
fi
step info 60 $PY -m quantkit info

export QUANTKIT_EXPECT_CUDA_KERNELS=1 QUANTKIT_EXPECT_EXT=1 HYPOTHESIS_PROFILE=ci
step test_cuda 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rfE --durations=15 \
  --junitxml="$OUT/test_cuda.xml"
step test_build 90 $PY -m pytest -q -p no:cacheprovider tests/test_build.py -rfE

step timing 150 $PY - <<'PYEOF'
"""Median ms of nearest_codeword (exact, fast) and of a chunked torch matmul + argmin, on the issue's shapes."""
import json, os, time
import torch
from quantkit import ops

def median_ms(fn, reps=7):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]

def matmul_argmin(z, c, chunk=8192):
    half = 0.5 * c.square().sum(1)
    return torch.cat([(z[i:i + chunk] @ c.T - half).argmax(1) for i in range(0, z.shape[0], chunk)])

rows = []
for n, d, k in [(16384, 8, 16384), (16384, 32, 16384), (16384, 256, 16384), (65536, 8, 65536),
                (16384, 8, 100000), (4096, 768, 100000)]:
    z, c = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    row = {"N": n, "D": d, "K": k}
    os.environ.pop("QUANTKIT_CUDA_NEAREST", None)
    exact = ops.nearest_codeword(z, c).indices
    row["exact_ms"] = median_ms(lambda: ops.nearest_codeword(z, c))
    os.environ["QUANTKIT_CUDA_NEAREST"] = "fast"
    fast = ops.nearest_codeword(z, c).indices
    row["fast_ms"] = median_ms(lambda: ops.nearest_codeword(z, c))
    os.environ.pop("QUANTKIT_CUDA_NEAREST")
    row["fast_equals_exact"] = bool(torch.equal(fast, exact))
    row["matmul_argmin_ms"] = median_ms(lambda: matmul_argmin(z, c))
    row["agree_matmul"] = float((matmul_argmin(z, c) == exact).float().mean())
    for key in ("exact", "fast"):
        row[f"{key}_gflops"] = 2 * n * k * d / row[f"{key}_ms"] / 1e6
    zs, cs = torch.randn(n, min(d, 64), device="cuda"), torch.randn(min(k, 16384), min(d, 64), device="cuda")
    row["soft_fwd_ms(N,min(D,64),min(K,16384))"] = median_ms(lambda: ops.soft_assign(zs, cs, 1.0), reps=3)
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "timing.json"), "w"), indent=1)
PYEOF

step bench 180 $PY benchmarks/bench_nearest.py --device cuda

echo "== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
