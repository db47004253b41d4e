#!/usr/bin/env bash
# One device call (session 3): build with CUDA, run the GPU and NCCL tests (the NCCL communicator gained deadlines),
# `grace run --backend cuda --verify` through the grace -> grace-run launcher, and the routing hooks on the GPU.
# Usage on the device: OUT=$OUT bash bench/cuda/run_device_hooks.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# The device image lacks Debian's header-only Spectra: carry its .deb in .deps/ (git-ignored) and unpack it here.
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
source bench/cuda/device_env.sh
PY=$(command -v python3)
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  2>&1 | grep -iE "error|warn" ; cmake --build build-dev -j16 2>&1 | tail -2
(cd build-dev && ctest -R '^(Cuda|Gpu|LocalMoe|Nccl|cuda)' --output-on-failure --timeout 600 2>&1 | tail -25) | tee "$OUT/gpu_tests.log"
G=build-dev/tools/grace/grace
$G gen --preset olmoe --tokens 4096 --seed 1 -o /tmp/t.npy >/dev/null && $G plan --trace /tmp/t.npy --topology 1x1 -q -o /tmp/p.json >/dev/null
$G run --plan /tmp/p.json --trace /tmp/t.npy --backend cuda --layers 2 --verify -o "$OUT/run_cuda.json" 2>&1 | tail -3 | tee "$OUT/run.log"
GRACE_BUILD_DIR=build-dev PYTHONUNBUFFERED=1 $PY tests/device/test_engine_hooks_gpu.py 2>&1 | tail -8 | tee "$OUT/hooks_gpu.log"
