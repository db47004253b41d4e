#!/usr/bin/env bash
# Session 5, one device call: build with CUDA + the Python module (system compilers, bench/cuda/device_env.sh), then
# 1. every GPU/NCCL C++ test (GpuWorkspace sharing is new since session 4),
# 2. tests/device/test_ep_gpu.py (grace.ep CUDA backend, shared workspace by default),
# 3. bench/torch/whole_model.py on OLMoE 256x128+16 (stock block vs grace.hf.patch),
# 4. bench/torch/bm_ep_moe.py (grace.ep.moe vs grace run vs vLLM's Triton fused MoE vs torch._grouped_mm),
# 5. whole_model.py on the other architectures with what time is left.
# Usage (repository root, carry .deps): OUT=$OUT bash bench/cuda/run_device_session5.sh
# Budget: GRACE_DEV_BUDGET_S (default 570 s) for the whole call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${GRACE_DEV_BUDGET_S:-570}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee "$OUT/steps.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3); B=build-dev
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
if [ ! -f $B/build.ninja ]; then
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF -DGRACE_BUILD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > /tmp/build.log 2>&1 || { echo "configure failed"; tail -30 /tmp/build.log; exit 1; }
fi
cmake --build $B -j16 --target grace grace-run _grace grace_cuda_tests grace_nccl_tests >> /tmp/build.log 2>&1 || { echo "build failed"; grep -B2 -A8 "error" /tmp/build.log | head -60; exit 1; }
echo "== build done at $(( $(date +%s) - T0 )) s; warnings: $(grep -c 'warning' /tmp/build.log)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
echo "== 1. GPU/NCCL C++ tests"
{ timeout 150 $B/tests/cuda/grace_cuda_tests; echo "grace_cuda_tests rc=$?"; timeout 60 $B/tests/cuda/grace_nccl_tests; \
  echo "grace_nccl_tests rc=$?"; } > "$OUT/gpu_tests.log" 2>&1
grep -E "PASSED|FAILED|rc=|tests ran" "$OUT/gpu_tests.log" | head -20
echo "== 2. test_ep_gpu.py (left $(left) s)"
GRACE_BUILD_DIR=$B timeout 150 $PY -X faulthandler tests/device/test_ep_gpu.py > "$OUT/test_ep_gpu.log" 2>&1
echo "test_ep_gpu rc=$?"; tail -12 "$OUT/test_ep_gpu.log"
fi
echo "== 3. whole_model.py, OLMoE (left $(left) s)"
L=$(( $(left) - 150 )); (( L > 220 )) && L=220
(( L > 40 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT/wm_olmoe" \
  --archs olmoe --shapes ${WM_SHAPES:-256x128+16} > "$OUT/whole_model.log" 2>&1; echo "whole_model rc=$?"; tail -15 "$OUT/whole_model.log"
echo "== 4. bm_ep_moe.py (left $(left) s)"
L=$(( $(left) - 10 )); (( L > 130 )) && L=130
(( L > 40 )) && timeout --kill-after=5 $L $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B \
  --tokens 2048,8192 --iters 10 --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -8 "$OUT/bm_ep_moe.log"
echo "== 5. whole_model.py, other archs (left $(left) s)"
L=$(( $(left) - 10 ))
(( L > 60 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT/wm_rest" \
  --archs ${WM_ARCHS:-qwen3_moe,mixtral} --shapes 256x128+16 > "$OUT/whole_model_rest.log" 2>&1; echo "whole_model rest rc=$?"; tail -8 "$OUT/whole_model_rest.log"
echo "== total $(( $(date +%s) - T0 )) s"
