#!/usr/bin/env bash
# Session 4, one device call: build with CUDA + the Python module (system compilers, bench/cuda/device_env.sh), then
# 1. every GPU/NCCL C++ test (the stream phases of GpuMoeLayer, GPU online adaptation, the existing layer tests),
# 2. tests/device/test_ep_gpu.py (grace.ep CUDA backend) and tests/device/test_engine_hooks_gpu.py,
# 3. `grace run --backend cuda --verify` through the grace -> grace-run launcher, with and without --adapt,
# 4. bench/torch/bm_ep_moe.py (grace.ep.moe vs grace run vs vLLM's Triton fused MoE vs torch._grouped_mm).
# Usage (repository root, carry .deps): OUT=$OUT bash bench/cuda/run_device_session4.sh
# Budget: GRACE_DEV_BUDGET_S (default 560 s) for the whole call; the benchmark gets what is left.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${GRACE_DEV_BUDGET_S:-560}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee "$OUT/steps.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3); B=build-dev
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF -DGRACE_BUILD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > /tmp/build.log 2>&1 || { echo "configure failed"; tail -30 /tmp/build.log; exit 1; }
cmake --build $B -j16 --target grace grace-run _grace grace_cuda_tests grace_nccl_tests >> /tmp/build.log 2>&1 || { echo "build failed"; grep -B2 -A8 "error" /tmp/build.log | head -60; exit 1; }
echo "== build done at $(( $(date +%s) - T0 )) s; warnings: $(grep -c 'warning' /tmp/build.log)"
echo "== 1. GPU/NCCL C++ tests"
{ timeout 150 $B/tests/cuda/grace_cuda_tests; echo "grace_cuda_tests rc=$?"; timeout 60 $B/tests/cuda/grace_nccl_tests; \
  echo "grace_nccl_tests rc=$?"; } > "$OUT/gpu_tests.log" 2>&1
grep -E "PASSED|FAILED|rc=|tests ran" "$OUT/gpu_tests.log" | head -20
echo "== 2. test_ep_gpu.py (left $(left) s)"
GRACE_BUILD_DIR=$B timeout 150 $PY -X faulthandler tests/device/test_ep_gpu.py > "$OUT/test_ep_gpu.log" 2>&1
echo "test_ep_gpu rc=$?"; tail -25 "$OUT/test_ep_gpu.log"
echo "== 2b. test_engine_hooks_gpu.py"
GRACE_BUILD_DIR=$B timeout 90 $PY -X faulthandler tests/device/test_engine_hooks_gpu.py 2>&1 | tail -5
echo "== 3. grace run --backend cuda (left $(left) s)"
G=$B/tools/grace/grace
$G gen --preset olmoe --tokens 4096 --seed 1 -o /tmp/t.npy >/dev/null && $G plan --trace /tmp/t.npy --topology 1x1 -q -o /tmp/p.json >/dev/null
timeout 60 $G run --plan /tmp/p.json --trace /tmp/t.npy --backend cuda --layers 2 --verify -o /tmp/run_cuda.json 2>&1 | tail -3
timeout 60 $G run --plan /tmp/p.json --trace /tmp/t.npy --backend cuda --layers 2 --batch-tokens 256 --adapt 2 --verify -o /tmp/run_cuda_adapt.json 2>&1 | tail -3
echo "== 3b. whole_model.py, OLMoE (left $(left) s)"
L=$(( $(left) - 120 )); (( L > 130 )) && L=130
(( L > 40 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT" \
  --archs olmoe --shapes 256x128+16 > "$OUT/whole_model.log" 2>&1; echo "whole_model rc=$?"; tail -25 "$OUT/whole_model.log"
echo "== 4. bm_ep_moe.py (left $(left) s)"
L=$(( $(left) - 10 )); (( L > 40 )) && timeout --kill-after=5 $L $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B \
  --tokens 2048,8192 --iters 10 --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -30 "$OUT/bm_ep_moe.log"
echo "== total $(( $(date +%s) - T0 )) s"
