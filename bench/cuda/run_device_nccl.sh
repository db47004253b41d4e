#!/bin/bash
# One device call for the NCCL communicator and the GPU MoE layer: build, the NCCL tests and the GPU tests under
# mpirun -n 1, the expert-GEMM threshold sweep, compute-sanitizer memcheck on the new tests.
# Usage (repository root): OUT=dir bash bench/cuda/run_device_nccl.sh
set -o pipefail
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MPIRUN="mpirun --allow-run-as-root -n 1"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
nproc; lscpu | grep 'Model name'
t0=$(date +%s)
cmake -S . -B build-dev -G Ninja -DGRACE_USE_CUDA=ON -DGRACE_BUILD_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
  > /tmp/build.log 2>&1 && cmake --build build-dev -j16 --target grace_cuda_tests grace_nccl_tests bm_moe_gpu \
  >> /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; cp /tmp/build.log "$OUT/"; exit 1; }
echo "== build $(( $(date +%s) - t0 )) s"
echo "== nccl tests"; timeout 90 $MPIRUN build-dev/tests/cuda/grace_nccl_tests 2>&1 | tee "$OUT/nccl_tests.log" | grep -E "OK \]|FAILED|PASSED|rror"
echo "== gpu tests (small shapes)"; timeout 150 $MPIRUN build-dev/tests/cuda/grace_cuda_tests \
  --gtest_filter='-GpuMoeLayer.Olmoe*:GpuMoeLayer.Qwen3*' 2>&1 | tee "$OUT/cuda_tests.log" | grep -E "OK \]|FAILED|PASSED|max rel|rror"
echo "== gpu tests (model shapes)"; timeout 200 $MPIRUN build-dev/tests/cuda/grace_cuda_tests \
  --gtest_filter='GpuMoeLayer.Olmoe*:GpuMoeLayer.Qwen3*' 2>&1 | tee -a "$OUT/cuda_tests.log" | grep -E "OK \]|FAILED|PASSED|max rel|rror"
echo "== sweep"; timeout 90 build-dev/bench/cuda/bm_moe_gpu --out "$OUT" --threshold-sweep 1 --iters 10 2>&1 | tee "$OUT/sweep.log"
echo "== memcheck"; timeout 150 $MPIRUN compute-sanitizer --tool memcheck --leak-check full build-dev/tests/cuda/grace_cuda_tests \
  --gtest_filter='GpuMoeLayer.SmallShapeOneNode*:GpuMoeLayer.OneGpu*:GpuMoeLayer.Rejects*' > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|LEAK SUMMARY|PASSED|FAILED" "$OUT/memcheck.log"
timeout 60 $MPIRUN compute-sanitizer --tool memcheck build-dev/tests/cuda/grace_nccl_tests >> "$OUT/memcheck.log" 2>&1
echo "memcheck nccl rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -3
echo "== total $(( $(date +%s) - t0 )) s"
