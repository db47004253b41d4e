#!/bin/bash
# One device call: build, GPU tests, compute-sanitizer memcheck, our benchmark, the PyTorch references on the
# same routing, the joined table. Usage (repository root): OUT=dir bench/cuda/run_device.sh
set -o pipefail
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/grace_routing
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
cmake -S . -B build-dev -G Ninja -DGRACE_USE_CUDA=ON -DGRACE_USE_MPI=OFF -DGRACE_BUILD_PYTHON=OFF \
      -DCMAKE_CUDA_ARCHITECTURES=90 > /tmp/build.log 2>&1 &&
  cmake --build build-dev -j16 --target grace_cuda_tests bm_moe_gpu >> /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
echo "== tests"; build-dev/tests/cuda/grace_cuda_tests 2>&1 | tee "$OUT/tests.log" | grep -E "OK|FAIL|PASSED|rel_l2|Skipped"
echo "== memcheck"; compute-sanitizer --tool memcheck --leak-check full build-dev/tests/cuda/grace_cuda_tests \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|LEAK SUMMARY|PASSED|FAILED" "$OUT/memcheck.log"
echo "== racecheck (shared memory), router + sort"; compute-sanitizer --tool racecheck \
  build-dev/tests/cuda/grace_cuda_tests --gtest_filter='GpuReplicaRouter.*:LocalMoe.MatchesCpuReferenceHybrid' \
  > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/racecheck.log"
cat "$OUT/racecheck.log" >> "$OUT/memcheck.log"; rm "$OUT/racecheck.log"
echo "== bench"; build-dev/bench/cuda/bm_moe_gpu --out "$OUT" --routing-dir /tmp/grace_routing 2>&1 | tee "$OUT/bench.log"
echo "== torch"; PYTHONUNBUFFERED=1 python3 bench/cuda/torch_moe_reference.py --routing-dir /tmp/grace_routing \
  --out "$OUT/torch_ref.json" 2>&1 | tee -a "$OUT/bench.log"
echo "== summary"; python3 bench/cuda/combine.py "$OUT"
