#!/usr/bin/env bash
# Session 5, second device call: the Mixtral-shape layer test (tests/device/test_ep_gpu.py LargeShapes), one MoE
# block per architecture stock vs grace.hf vs fp32 (bench/torch/hf_block_check.py), and bm_ep_moe.py again.
# Usage (repository root, carry .deps): OUT=$OUT bash bench/cuda/run_device_session5b.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3); B=build-dev
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF -DGRACE_BUILD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > /tmp/build.log 2>&1
cmake --build $B -j16 --target grace _grace >> /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
GRACE_BUILD_DIR=$B timeout 200 $PY -X faulthandler tests/device/test_ep_gpu.py LargeShapes OneGpu 2>&1 | tee $OUT/test_ep_gpu.log | grep -v "^  " | tail -30
grep "mixtral shape\|rel L2" $OUT/test_ep_gpu.log
PYTHONPATH=$PWD/$B/python timeout 150 $PY bench/torch/hf_block_check.py --archs mixtral,olmoe,qwen3_moe --tokens 512,32768 --out $OUT/hf_block_check.json 2>&1 | tail -8
L=130; timeout --kill-after=5 $L $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B --tokens 2048,8192 --iters 10 --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -8 $OUT/bm_ep_moe.log
PYTHONPATH=$PWD/$B/python timeout --kill-after=5 ${WM_LIMIT:-150} $PY bench/torch/whole_model.py --out "$OUT/wm" \
  --archs ${WM_ARCHS:-olmoe} --shapes ${WM_SHAPES:-256x128+16} --stock-experts eager > "$OUT/whole_model.log" 2>&1
echo "whole_model rc=$?"; tail -30 "$OUT/wm/whole_model.md"
