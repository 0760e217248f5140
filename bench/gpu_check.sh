#!/usr/bin/env bash
# One call on the GPU machine: build the CUDA extension, run the GPU tests, run the intervention
# latency benchmarks (eager and torch.compile), print a short table. Results land in $OUT (device
# tool) or bench/results/. Each section has its own time limit and the whole script stops starting
# sections after $GPU_CHECK_BUDGET seconds (default 540), so a 10-minute call always returns.
#
# Usage (repo root): bash bench/gpu_check.sh
#   device tool: run(command="bash bench/gpu_check.sh", timeout_s=600)
# Sections (about 8 minutes on an H100/H200 in all):
#   build       CUDA + CPU extensions (nvcc, ~15 s)
#   tests       tests/gpu and the gpu-marked op tests of tests/ops: kernels vs references, CUDA
#               graphs, inductor, compiled patched decode
#   3b          random Llama-3.2-3B shape, bf16: every eager condition at 1x128, 8x128, 64x128,
#               1x1024, 8x1024; decode under torch.compile(mode="reduce-overhead") at 1x128
#   8b          random Llama-3-8B shape, bf16: the main eager conditions at 1x128 and 64x128
# pyvene and nnsight are not installed there (no internet, nothing from outside): their rows are
# absent on the GPU and the results file says so.
# Dry run of the script's logic on a CPU machine (tiny models, no GPU tests run):
#   GPU_CHECK_MODEL_3B=tiny-llama GPU_CHECK_MODEL_8B=tiny-qwen2 OUT=/tmp/gc bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export EMOKERNELS_BUILD_DIR="${EMOKERNELS_BUILD_DIR:-/tmp/emokernels-build}" TORCH_CUDA_ARCH_LIST=9.0
OUTDIR="${OUT:-bench/results}"; mkdir -p "$OUTDIR"
BUDGET="${GPU_CHECK_BUDGET:-540}"
MODEL_3B="${GPU_CHECK_MODEL_3B:-gpu:llama-3.2-3b}" MODEL_8B="${GPU_CHECK_MODEL_8B:-gpu:llama-3-8b}"
START=$(date +%s)
log="$OUTDIR/gpu_check.log"

# section NAME LIMIT_S COMMAND...: run unless the budget is spent; never longer than what is left
section() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (budget spent)" >&2; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s)" >&2  # stderr: not cut by a tail
  timeout "$limit" "$@"
  echo "-- $name: exit $?" >&2
}

{
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || echo "commit: (no git)"

section build 120 python3 - <<'PY'
import time
t = time.time()
from emokernels.ops import backends
print("cuda ext:", backends.cuda_ext() is not None, backends.cuda_ext_error() or "", f"{time.time()-t:.1f}s")
t = time.time()
print("cpu ext:", backends.cpu_ext() is not None, backends.cpu_ext_error() or "", f"{time.time()-t:.1f}s")
PY

section tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/ops --junitxml="$OUTDIR/gpu_tests.xml" 2>&1 | tail -25

section 3b 300 python3 bench/latency.py --models "$MODEL_3B" --shapes 1x128,8x128,64x128,1x1024,8x1024 \
  --rounds 6 --warmup 2 --compile reduce-overhead --compile-shapes 1x128 --suffix=-llama-3.2-3b 2>&1 | grep -v Warning | tail -90

section 8b 150 python3 bench/latency.py --models "$MODEL_8B" --shapes 1x128,64x128 --rounds 5 --warmup 2 \
  --conditions hooks_steer,emk_fused_steer,hooks_circuit,emk_fused_circuit,emk_fused_bias,folded_bias \
  --suffix=-llama-3-8b 2>&1 | grep -v Warning | tail -30
echo "== total $(( $(date +%s) - START ))s"
} 2>&1 | tee "$log"
[ "$OUTDIR" != bench/results ] && cp bench/results/NVIDIA* "$OUTDIR"/ 2>/dev/null; true
