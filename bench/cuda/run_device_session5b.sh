#!/usr/bin/env bash
# Session 5, second device call: the Mixtral-shape layer test and the binding tests (tests/device/test_ep_gpu.py
# LargeShapes OneGpu), one MoE block per architecture stock vs grace.hf vs fp32 (bench/torch/hf_block_check.py),
# the OLMoE whole model with the stock block on transformers' default and eager experts backends and the time inside
# the MoE blocks (bench/torch/whole_model.py), then bench/torch/bm_ep_moe.py with what is left.
# Usage (repository root, carry .deps): OUT=$OUT [STEPS="tests hf wm bm"] [BM_TOKENS=2048,8192] \
#     bash bench/cuda/run_device_session5b.sh   (STEPS: which of the four to run, in this order)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
exec > >(tee "$OUT/steps.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3); B=build-dev
export PYTHONUNBUFFERED=1
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF -DGRACE_BUILD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > /tmp/build.log 2>&1
cmake --build $B -j16 --target grace grace-run _grace >> /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
STEPS=" ${STEPS:-tests hf wm bm} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
if step tests; then
echo "== tests"
GRACE_BUILD_DIR=$B timeout 200 $PY -X faulthandler tests/device/test_ep_gpu.py LargeShapes OneGpu > $OUT/test_ep_gpu.log 2>&1
echo "test_ep_gpu rc=$?"; grep -E "^(ok|FAIL|ERROR)|Ran |OK|FAILED|mixtral shape|rel L2" $OUT/test_ep_gpu.log | tail -20
fi
if step hf; then
echo "== hf_block_check"
PYTHONPATH=$PWD/$B/python timeout 150 $PY bench/torch/hf_block_check.py --archs ${HF_ARCHS:-mixtral,olmoe,qwen3_moe} \
  --tokens 512,32768 --out $OUT/hf_block_check.json 2>&1 | tail -8
fi
if step wm; then
echo "== whole_model"
PYTHONPATH=$PWD/$B/python timeout --kill-after=5 ${WM_LIMIT:-150} $PY bench/torch/whole_model.py --out "$OUT/wm" \
  --archs ${WM_ARCHS:-olmoe,mixtral} --shapes ${WM_SHAPES:-256x128+16} --stock-experts eager > "$OUT/whole_model.log" 2>&1
echo "whole_model rc=$?"; tail -22 "$OUT/wm/whole_model.md"
fi
if step bm; then
echo "== bm_ep_moe"
L=${BM_LIMIT:-100}; timeout --kill-after=5 $L $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B --tokens ${BM_TOKENS:-2048,8192} \
  --iters 10 --grace-run-steps 3 --out "$OUT/bm_ep_moe.json" > "$OUT/bm_ep_moe.log" 2>&1; echo "bench rc=$?"
tail -8 $OUT/bm_ep_moe.log
fi
