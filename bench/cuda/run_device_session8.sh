#!/usr/bin/env bash
# Session 8, one device call: what changed after session 6's calls, on the GPU (session 7 ran none). Build, then
# 1. every grace_cuda_tests test (new since session 6: LocalMoe.ForwardF32IsTheWidenedBf16Output,
#    LocalMoe.Sm90ForwardCapturedInACudaGraph, GpuMoeLayerPhases.OneGpuWithoutHostIdCheck and .OneGpuCapturedInACudaGraph;
#    NcclOverGivenHostCommunicator now also checks a general-path call's destinations after a one-GPU call),
# 2. tests/device/test_ep_gpu.py (grace.ep.moe against forward_reference bit for bit; check_ids=False; moe captured in
#    a CUDA graph) and the shared-workspace test,
# 3. bench/torch/bm_ep_moe.py at the olmoe and qwen3-30b-a3b shapes, T = 2048 / 8192, with each method's kernels
#    (--kernels), with Buffer(check_ids=False) (no host wait), and that moe captured in a CUDA graph (ep_graph_ms),
# 4. bench/torch/whole_model.py on OLMoE, Qwen3-30B-A3B then Mixtral in one process (grace.hf passes
#    check_ids=False; Mixtral after Qwen3 is session 6 call 2's out-of-memory, after gc.collect between
#    architectures was added), as far as the time allows (results are written after each architecture).
# Usage (repository root, carry .deps): OUT=$OUT bash bench/cuda/run_device_session8.sh
# Env: GRACE_DEV_BUDGET_S, SKIP_TESTS=1, TEST_LIMIT, GPU_FILTER, BM_LIMIT, BM_SHAPES, BM_TOKENS, BM_ITERS,
# BM_KERNELS (empty: no --kernels), SKIP_WM=1, WM_ARCHS, WM_SHAPES.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${GRACE_DEV_BUDGET_S:-560}
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
TARGETS="grace grace-run _grace"; [ "${SKIP_TESTS:-0}" != 1 ] && TARGETS="$TARGETS grace_cuda_tests"
cmake --build $B -j16 --target $TARGETS >> /tmp/build.log 2>&1 || { echo "build failed"; grep -B2 -A8 "error" /tmp/build.log | head -60; exit 1; }
echo "== build done at $(( $(date +%s) - T0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
echo "== 1. grace_cuda_tests, all"
timeout ${TEST_LIMIT:-150} $B/tests/cuda/grace_cuda_tests --gtest_filter="${GPU_FILTER:-*}" > "$OUT/gpu_tests.log" 2>&1
echo "grace_cuda_tests rc=$?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|OK \]|FAILED \]|SKIPPED \]|Failure" "$OUT/gpu_tests.log" | head -50
echo "== 2. test_ep_gpu.py, test_ep_workspace.py (left $(left) s)"
GRACE_BUILD_DIR=$B timeout 100 $PY -X faulthandler tests/device/test_ep_gpu.py > "$OUT/test_ep_gpu.log" 2>&1
echo "test_ep_gpu rc=$?"; grep -E "^(ok|FAIL|ERROR)|Ran |^OK|FAILED|rel L2|Error|skipped" "$OUT/test_ep_gpu.log" | tail -15
GRACE_BUILD_DIR=$B timeout 60 $PY tests/python/test_ep_workspace.py > "$OUT/test_ep_workspace.log" 2>&1
echo "test_ep_workspace rc=$?"; tail -3 "$OUT/test_ep_workspace.log"
fi
echo "== 3. bm_ep_moe.py (left $(left) s)"
timeout --kill-after=5 ${BM_LIMIT:-170} $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B --tokens ${BM_TOKENS:-2048,8192} \
  --shapes ${BM_SHAPES:-olmoe,qwen3-30b-a3b} --iters ${BM_ITERS:-10} --grace-run-steps 0 ${BM_KERNELS---kernels} \
  --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -8 "$OUT/bm_ep_moe.log"
echo "== 4. whole_model.py, ${WM_ARCHS:-olmoe,qwen3_moe,mixtral} in one process (left $(left) s)"
L=$(( $(left) - 10 ))
[ "${SKIP_WM:-0}" != 1 ] && (( L > 60 )) && PYTHONPATH=$PWD/$B/python timeout --kill-after=5 $L $PY bench/torch/whole_model.py --out "$OUT/wm" \
  --archs ${WM_ARCHS:-olmoe,qwen3_moe,mixtral} --shapes ${WM_SHAPES:-256x128+16} > "$OUT/whole_model.log" 2>&1; echo "whole_model rc=$?"
[ -f "$OUT/wm/whole_model.md" ] && tail -14 "$OUT/wm/whole_model.md"
echo "== total $(( $(date +%s) - T0 )) s"
