#!/usr/bin/env bash
# One GPU session in one call: build, check, measure, and write everything under $OUT.
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# on a lent machine (/work/.library/device/README.md: torch 2.11 + triton 3.6 there,
# the repository copied in, results come back from $OUT: at most 8 files, so the
# logs are gathered into a few). Steps, each with its own time budget (580 s in
# all, under the 10-minute limit) so that a failing step does not hide the others:
#   1. versions, nvidia-smi                                        -> env.txt
#   2. build exposure_slot._C with its CUDA kernels (when csrc/cuda has any) against
#      the device's torch: pip install -e . --no-build-isolation  -> build.log
#   3. the parity suites on every backend the GPU runs (cuda, triton, cpu), the
#      compile/spill test, the module tests                       -> tests.log
#   4. compute-sanitizer memcheck and racecheck on benchmarks/sanitize_cuda.py,
#      memcheck on a small triton-backend module run              -> sanitizer.log
#   5. pytest benchmarks/test_bench_gpu.py, then any other *gpu*/realtime benchmark
#      files, JSON and console                 -> bench.json, bench-other.json, bench.txt
# Then prints a short summary (the reply carries the end of the output).
# Packages the machine lacks (KINDS.md lists what it has; pypng and av may be
# missing) travel as wheels in .whl, as /work/.library/device/README.md explains.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" >>"$OUT/$log"
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - start)) s" | tee -a "$OUT/$log" >>"$OUT/summary.txt"
  return 0
}

# 1. Environment.
{
  date -u
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv
  python -c "import sys, torch, triton; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version 2>/dev/null | tail -2
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1

# 2. Build (the device's torch is kept: no build isolation, no dependency resolution).
# H100 and H200 are sm_90: one architecture halves nvcc's work; 16 cores compile the
# sources in parallel.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
step build 150 build.log pip install -q --no-build-isolation --no-deps -e . \
  || true
python -c "from exposure_slot import ops; print('cpu', ops.cpu_kernels_available(), \
'cuda', ops.cuda_kernels_available(), 'triton', ops.triton_kernels_available())" \
  >>"$OUT/summary.txt" 2>&1

# 3. Tests: parity on every fused backend that runs here, then the compile test and
#    the module-level backend tests.
step parity 100 tests.log python -m pytest -q -x -p no:cacheprovider \
  tests/test_mask_fusion.py tests/test_slot_attention_pass.py -k "cuda or triton"
step modules 50 tests.log python -m pytest -q -p no:cacheprovider \
  tests/test_slot_in_slot_fused.py tests/test_backends.py tests/test_cuda_backend.py \
  tests/test_engine.py
step compile 30 tests.log python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py

# 4. compute-sanitizer: the CUDA kernels through benchmarks/sanitize_cuda.py (the CUDA
#    backend's own script, when present); the Triton kernels through one small
#    module forward + backward.
cat >/tmp/sanitize_triton.py <<'EOF'
import torch
from exposure_slot import SlotInSlotAttention
torch.manual_seed(0)
m = SlotInSlotAttention(128, (3, 7), iters=2, backend="triton").cuda()
k, v = (torch.randn(2, 37 * 29, 128, device="cuda", requires_grad=True) for _ in range(2))
a, b, masks = m(k, v)
(a.square().mean() + b.mean() + masks[-1].square().mean()).backward()
torch.cuda.synchronize()
print("triton ok", float(a.double().abs().sum()))
EOF
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  if [ -f benchmarks/sanitize_cuda.py ]; then
    for tool in memcheck racecheck; do
      step "sanitizer $tool cuda" 20 sanitizer.log \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 python benchmarks/sanitize_cuda.py
    done
  fi
  step "sanitizer memcheck triton" 20 sanitizer.log \
    "$SANITIZER" --tool memcheck --error-exitcode 1 python /tmp/sanitize_triton.py
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt" >"$OUT/sanitizer.log"
fi

# 5. Benchmarks: this backend's suite first, then any other GPU or real-time suite.
step benchmarks 140 bench.txt python -m pytest -p no:cacheprovider benchmarks/test_bench_gpu.py \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds
OTHER=$(ls benchmarks/test_bench_*gpu*.py benchmarks/test_bench_*realtime*.py 2>/dev/null \
  | grep -v 'test_bench_gpu.py$')
if [ -n "$OTHER" ]; then
  step "other benchmarks" 50 bench.txt python -m pytest -p no:cacheprovider $OTHER \
    --benchmark-json="$OUT/bench-other.json" --benchmark-columns=median,iqr,rounds
fi

echo "--- summary"; cat "$OUT/summary.txt"
echo "--- benchmark table"; sed -n '/benchmark medians/,$p' "$OUT/bench.txt" | tail -40
