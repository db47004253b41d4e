#!/bin/bash
# One device call for the sm90 grouped GEMM: build; the benchmark with every GEMM backend side by side, the
# PyTorch references on the same routing and the joined table; the GPU tests (incl. the model-shape layer
# comparisons, now on the sm90 default); `grace run --backend cuda --verify`; compute-sanitizer memcheck and
# racecheck. Most important first: a call cut short at its limit still brings back the benchmark.
# Each step runs under its own `timeout`; the script goes on after a failing step and prints a summary.
# Usage (repository root): OUT=dir bash bench/cuda/run_device_sm90.sh
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/grace_routing
B=build-dev W=/tmp/grace_sm90; mkdir -p $W
MPIRUN="mpirun --allow-run-as-root --bind-to none -n 1"
declare -a SUMMARY=()
step() {  # step NAME LIMIT_S LOG CMD...
    local name=$1 limit=$2 log=$3; shift 3
    echo "== $name $(date +%T)" | tee -a "$OUT/$log"
    local s=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >> "$OUT/$log" 2>&1
    local rc=$? v=PASS
    (( rc == 124 || rc == 137 )) && v=TIMEOUT
    (( rc != 0 && rc != 124 && rc != 137 )) && v="FAIL(rc=$rc)"
    SUMMARY+=("$(printf '%-8s %-40s %4ds' "$v" "$name" $(( $(date +%s) - s )))")
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; git log -1 --oneline; } > "$OUT/device.txt" 2>&1
step configure 60 build.log cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_USE_MPI=ON \
    -DGRACE_BUILD_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90
step build 200 build.log cmake --build $B -j"$(nproc)" --target grace grace_cuda_tests grace_nccl_tests bm_moe_gpu
rm -f /tmp/grace_routing/*
step bm_moe_gpu 150 bench.log $B/bench/cuda/bm_moe_gpu --out "$OUT" --routing-dir /tmp/grace_routing
step "torch reference" 120 bench.log python3 bench/cuda/torch_moe_reference.py --routing-dir /tmp/grace_routing --out "$OUT/torch_ref.json"
step combine 30 bench.log python3 bench/cuda/combine.py "$OUT"
step "grace_cuda_tests (all)" 150 tests.log $MPIRUN $B/tests/cuda/grace_cuda_tests
step "grace_nccl_tests" 60 tests.log $MPIRUN $B/tests/cuda/grace_nccl_tests
G=$B/tools/grace/grace
step "gen+plan" 30 grace_run.log bash -c "$G gen --preset olmoe --tokens 512 --seed 1 -o $W/t.npy && $G plan --trace $W/t.npy --topology 1x1 -o $W/p.json -q"
for r in tar wrr; do
    step "grace run --backend cuda --routing $r --verify" 60 grace_run.log $MPIRUN $G run --plan $W/p.json --trace $W/t.npy \
        --layers 1 --batch-tokens 256 --dtype bf16 --verify --tolerance 3e-2 --threads "$(nproc)" --routing $r \
        --backend cuda -o "$OUT/run_cuda_$r.json"
done
step "memcheck LocalMoe + small layer" 120 memcheck.log $MPIRUN compute-sanitizer --tool memcheck --leak-check full \
    $B/tests/cuda/grace_cuda_tests --gtest_filter='LocalMoe.*:GpuReplicaRouter.*:GpuMoeLayer.SmallShapeOneNode*'
step "racecheck sm90" 90 memcheck.log compute-sanitizer --tool racecheck $B/tests/cuda/grace_cuda_tests \
    --gtest_filter='LocalMoe.Sm90CountsAndBackendChoice:LocalMoe.MatchesCpuReferenceHybrid'
{ echo "== summary"; for s in "${SUMMARY[@]}"; do echo "$s"; done
  grep -hE "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/tests.log"
  grep -hE "verify|max_rel" "$OUT/grace_run.log" | tail -4
  grep -hE "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/memcheck.log"; } | tee "$OUT/summary.txt"
