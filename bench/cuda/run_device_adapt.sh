#!/bin/bash
# Device call for online adaptation on the GPU runtime (issue #13 item 3): build, the GpuAdaptation tests (one GPU:
# 4 ranks as threads over the test hub), compute-sanitizer memcheck on them, and, with 4 or more GPUs,
# tests/mpi/test_adapt.py with grace run --backend nccl under mpirun -n 4 (tables equal grace eval --adapt's).
# Usage (repository root): OUT=dir bash bench/cuda/run_device_adapt.sh
set -o pipefail
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
t0=$(date +%s)
cmake -S . -B build-dev -G Ninja -DGRACE_USE_CUDA=ON -DGRACE_BUILD_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
  > /tmp/build.log 2>&1 && cmake --build build-dev -j16 --target grace_cuda_tests grace \
  >> /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; cp /tmp/build.log "$OUT/"; exit 1; }
echo "== build $(( $(date +%s) - t0 )) s"
echo "== GpuAdaptation tests"
timeout 120 build-dev/tests/cuda/grace_cuda_tests --gtest_filter='GpuAdaptation*:GpuReplicaRouter*:RouteTable*' 2>&1 \
  | tee "$OUT/adapt_tests.log" | grep -E "OK \]|FAILED|PASSED|SKIPPED|rror"
echo "== memcheck"
timeout 200 compute-sanitizer --tool memcheck --leak-check full build-dev/tests/cuda/grace_cuda_tests \
  --gtest_filter='GpuAdaptation*' > "$OUT/adapt_memcheck.log" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|LEAK SUMMARY|PASSED|FAILED" "$OUT/adapt_memcheck.log"
ngpu=$(nvidia-smi -L | wc -l)
if [ "$ngpu" -ge 4 ]; then
  echo "== grace run --backend nccl --adapt (4 ranks, 2x2) vs grace eval --adapt"
  GRACE_BIN=build-dev/tools/grace/grace GRACE_RUN_BACKEND=nccl GRACE_MPIEXEC=mpirun timeout 400 \
    /usr/bin/python3 tests/mpi/test_adapt.py 2>&1 | tee "$OUT/adapt_nccl.log" | grep -E "^FAIL|failed" ; \
    echo "test_adapt nccl rc=${PIPESTATUS[0]} ($(grep -c '^ok' "$OUT/adapt_nccl.log") checks ok)"
else
  echo "== $ngpu GPU(s): the 4-rank nccl run needs 4 (kind nvidia-h100-x4)"
fi
echo "== total $(( $(date +%s) - t0 )) s"
