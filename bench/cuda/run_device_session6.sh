#!/usr/bin/env bash
# Session 6, one device call: the one-GPU path of GpuMoeLayer::forward_async (LocalMoe on the mapped slots, no
# exchange stages). Build, then
# 1. the 1x1 GPU tests of the layer (bit-identical to forward_device, bad ids, int64 ids, capture refusal) and the
#    shared-workspace test,
# 2. tests/device/test_ep_gpu.py OneGpu (grace.ep.moe against forward_reference bit for bit),
# 3. bench/torch/bm_ep_moe.py (binding cost; grace.ep.moe vs vLLM's Triton fused MoE and torch._grouped_mm),
# 4. bench/torch/whole_model.py on OLMoE 256x128+16 (stock block vs grace.hf.patch, time inside the MoE blocks),
# 5. whole_model.py on Qwen3-30B-A3B and Mixtral with what time is left.
# Usage (repository root, carry .deps): OUT=$OUT bash bench/cuda/run_device_session6.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${GRACE_DEV_BUDGET_S:-470}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee "$OUT/steps.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3); B=build-dev
export PYTHONUNBUFFERED=1
if [ ! -f $B/build.ninja ]; then
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF -DGRACE_BUILD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > /tmp/build.log 2>&1 || { echo "configure failed"; tail -30 /tmp/build.log; exit 1; }
fi
cmake --build $B -j16 --target grace grace-run _grace grace_cuda_tests >> /tmp/build.log 2>&1 || { echo "build failed"; grep -B2 -A8 "error" /tmp/build.log | head -60; exit 1; }
echo "== build done at $(( $(date +%s) - T0 )) s"
echo "== 1. GPU C++ tests (1x1 layer, phases, shared workspace)"
timeout 90 $B/tests/cuda/grace_cuda_tests --gtest_filter='GpuMoeLayerPhases.*:GpuMoeLayer.OneGpu*:GpuWorkspace*:LocalMoe.*' \
  > "$OUT/gpu_tests.log" 2>&1; echo "grace_cuda_tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|OK \]|FAILED \]|Failure" "$OUT/gpu_tests.log" | head -30
echo "== 2. test_ep_gpu.py OneGpu (left $(left) s)"
GRACE_BUILD_DIR=$B timeout 90 $PY -X faulthandler tests/device/test_ep_gpu.py OneGpu > "$OUT/test_ep_gpu.log" 2>&1
echo "test_ep_gpu rc=$?"; grep -E "^(ok|FAIL|ERROR)|Ran |^OK|FAILED|rel L2|Error" "$OUT/test_ep_gpu.log" | tail -15
echo "== 3. bm_ep_moe.py (left $(left) s)"
timeout --kill-after=5 ${BM_LIMIT:-110} $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B --tokens ${BM_TOKENS:-2048,8192} \
  --shapes ${BM_SHAPES:-olmoe,qwen3-30b-a3b} \
  --iters 10 --grace-run-steps 0 --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -7 "$OUT/bm_ep_moe.log"
echo "== 4. whole_model.py, OLMoE (left $(left) s)"
L=$(( $(left) - 5 )); (( L > ${WM_LIMIT:-130} )) && L=${WM_LIMIT:-130}
(( L > 30 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT/wm_olmoe" \
  --archs olmoe --shapes 256x128+16 > "$OUT/whole_model.log" 2>&1; echo "whole_model rc=$?"; tail -16 "$OUT/wm_olmoe/whole_model.md"
echo "== 5. whole_model.py, Qwen3 and Mixtral (left $(left) s)"
L=$(( $(left) - 10 ))
(( L > 60 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT/wm_rest" \
  --archs ${WM_ARCHS:-qwen3_moe,mixtral} --shapes 256x128+16 > "$OUT/whole_model_rest.log" 2>&1; echo "whole_model rest rc=$?"
[ -f "$OUT/wm_rest/whole_model.md" ] && tail -14 "$OUT/wm_rest/whole_model.md"
echo "== total $(( $(date +%s) - T0 )) s"
