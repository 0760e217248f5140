#!/usr/bin/env bash
# One call on the GPU machine: build the CUDA extension, run the GPU tests, run the intervention
# latency benchmarks, print a short table. Results land in $OUT (device tool) or bench/results/.
# Usage (repo root): bash bench/gpu_check.sh        (about 5-7 minutes on an H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export EMOKERNELS_BUILD_DIR="${EMOKERNELS_BUILD_DIR:-/tmp/emokernels-build}" TORCH_CUDA_ARCH_LIST=9.0
OUTDIR="${OUT:-bench/results}"; mkdir -p "$OUTDIR"
log="$OUTDIR/gpu_check.log"
{
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || echo "commit: (no git)"

echo "== build (CUDA + CPU extensions)"
python3 - <<'PY'
import time
t = time.time()
from emokernels.ops import backends
print("cuda ext:", backends.cuda_ext() is not None, backends.cuda_ext_error() or "", f"{time.time()-t:.1f}s")
t = time.time()
print("cpu ext:", backends.cpu_ext() is not None, backends.cpu_ext_error() or "", f"{time.time()-t:.1f}s")
PY

echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu -x --junitxml="$OUTDIR/gpu_tests.xml" 2>&1 | tail -25

echo "== latency benchmarks"
timeout 300 python3 bench/latency.py --models gpu:llama-3.2-3b --shapes 1x128,8x128,64x128,1x1024 --rounds 8 --warmup 2 2>&1 | tail -80
} 2>&1 | tee "$log"
[ "$OUTDIR" != bench/results ] && cp bench/results/NVIDIA* "$OUTDIR"/ 2>/dev/null; true
