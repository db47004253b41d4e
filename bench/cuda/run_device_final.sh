#!/bin/bash
# One device call closing the GPU gaps: build; `grace run --backend cuda --verify` end to end on a generated olmoe
# trace with a 1x1 plan for the primary / wrr / tar policies, next to the CPU backend with the same command; the
# GpuMoeLayer model-shape comparisons (olmoe, qwen3-30b-a3b); the whole-layer benchmark vs PyTorch (eager loop and
# torch._grouped_mm) and the expert-GEMM-vs-dense table with the default GEMM path; compute-sanitizer memcheck.
# Every step has its own time limit and the script goes on after a failing step; a summary comes last.
# Usage (repository root): OUT=dir bash bench/cuda/run_device_final.sh
#   GRACE_FINAL_BUDGET_S (default 440): wall-clock budget of the whole script; a step gets at most what is left.
#   GRACE_FINAL_TOKENS (default 4096): tokens of the generated trace.
#   GRACE_FINAL_SKIP_GPU=1: only the steps that need no GPU (build of the CPU targets, gen, plan, CPU runs).
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${GRACE_FINAL_BUDGET_S:-440}
TOKENS=${GRACE_FINAL_TOKENS:-4096}
SKIP_GPU=${GRACE_FINAL_SKIP_GPU:-0}
BUILD=${GRACE_FINAL_BUILD_DIR:-build-final}
LOGS=/tmp/grace_final_logs; rm -rf "$LOGS"; mkdir -p "$LOGS" /tmp/grace_routing
WORK=/tmp/grace_final_work; rm -rf "$WORK"; mkdir -p "$WORK"
NPROC=$(nproc)
# --bind-to none: Open MPI binds a 1-process job to one core by default, which serialized the --threads 16 verify
# reference in the first device call (every grace run hit its limit).
MPIRUN="mpirun --allow-run-as-root --bind-to none -n 1"
T0=$(date +%s)
declare -a SUMMARY=()

# Packs the logs into one file under $OUT after every step, so a call cut short still brings back what ran.
pack() { tar -czf "$OUT/final_logs.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/final_logs.tar.gz.tmp" "$OUT/final_logs.tar.gz"; }
# step NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout min(LIMIT, budget left - 5)`, tees into LOGFILE.
step() {
    local name=$1 limit=$2 log=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - T0) - 5 ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        SUMMARY+=("SKIP  $name (no time left)"); echo "== $name: skipped, no time left"; return 1
    fi
    echo "== $name (limit ${limit}s) $(date +%T)"
    local s=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOGS/$log"
    local rc=${PIPESTATUS[0]} d=$(( $(date +%s) - s ))
    local verdict=PASS
    (( rc == 124 || rc == 137 )) && verdict=TIMEOUT
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAIL(rc=$rc)"
    SUMMARY+=("$(printf '%-8s %-44s %4ds' "$verdict" "$name" "$d")")
    echo "== $name: $verdict in ${d}s"
    pack
    return "$rc"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; nvidia-smi;
  echo "nproc $NPROC"; lscpu | grep 'Model name'; git log -1 --oneline 2>/dev/null; } > "$LOGS/device.txt" 2>&1
head -2 "$LOGS/device.txt"

# 1. Build (only the needed targets).
TARGETS="grace"
[[ $SKIP_GPU == 1 ]] || TARGETS="grace grace_cuda_tests grace_nccl_tests bm_moe_gpu"
step "cmake configure" 60 build.log cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON \
    -DGRACE_USE_MPI=ON -DGRACE_BUILD_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90 > /dev/null
step "build ($TARGETS)" 200 build.log cmake --build "$BUILD" -j"$NPROC" --target $TARGETS > /dev/null
tail -3 "$LOGS/build.log"
G=$BUILD/tools/grace/grace

# 2. `grace run` end to end: olmoe trace (4096 tokens), 1x1 plan, verify against the dense CPU reference (one layer,
#    4 batches of 1024 tokens so the WRR offsets carry; the plain-loop reference costs ~200 GMAC per layer).
TRACE=$WORK/olmoe.npy PLAN=$WORK/plan_1x1.json
step "grace gen olmoe $TOKENS" 60 grace_run.log $G gen --preset olmoe --tokens $TOKENS --seed 1 -o "$TRACE"
step "grace plan 1x1" 60 grace_run.log $G plan --trace "$TRACE" --topology 1x1 -o "$PLAN" -q
RUN_COMMON="--plan $PLAN --trace $TRACE --layers 1 --batch-tokens 1024 --dtype bf16 --verify --tolerance 3e-2 --threads $NPROC"
for backend in cuda mpi; do
    [[ $backend == cuda && $SKIP_GPU == 1 ]] && continue
    for policy in primary wrr tar; do
        echo "\$ $MPIRUN $G run $RUN_COMMON --routing $policy --backend $backend -o $WORK/run_${backend}_${policy}.json" >> "$LOGS/grace_run.log"
        step "grace run --backend $backend --routing $policy" 150 grace_run.log \
            $MPIRUN $G run $RUN_COMMON --routing $policy --backend $backend -o "$WORK/run_${backend}_${policy}.json"
        cp "$WORK/run_${backend}_${policy}.json" "$LOGS/" 2>/dev/null
    done
done
# One line per run: verify error and per-phase times (max over ranks, summed over layers and batches).
/usr/bin/env python3 - "$WORK" > "$LOGS/grace_run_table.txt" 2>&1 <<'EOF'
import glob, json, os, sys
print("| backend | routing | max_rel_err | passed | total s | routing s | layout s | dispatch s | expert s | combine s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "run_*.json"))):
    r = json.load(open(f)); t = r["time_s"]; v = r.get("verify", {})
    print("| %s | %s | %.3e | %s | %.4f | %.4f | %.4f | %.4f | %.4f | %.4f |" % (r["backend"], r["routing"],
          v.get("max_rel_err", float("nan")), v.get("passed"), t["total"]["max"], t["routing"]["max"],
          t["layout"]["max"], t["dispatch"]["max"], t["expert"]["max"], t["combine"]["max"]))
EOF
cat "$LOGS/grace_run_table.txt"; pack

if [[ $SKIP_GPU != 1 ]]; then
    # 3. GpuMoeLayer vs the CPU MoeLayer at the model shapes (2x2 on the one GPU), every scheme x policy listed there.
    step "GpuMoeLayer model shapes (olmoe, qwen3)" 170 model_shapes.log \
        $MPIRUN $BUILD/tests/cuda/grace_cuda_tests --gtest_filter='GpuMoeLayer.Qwen3*:GpuMoeLayer.Olmoe*'

    # 4. Whole layer vs PyTorch on the same routing, expert GEMMs vs dense (default GEMM path: hybrid, cut-off 512).
    rm -f /tmp/grace_routing/*
    step "bm_moe_gpu" 150 bench.log $BUILD/bench/cuda/bm_moe_gpu --out "$LOGS" --routing-dir /tmp/grace_routing
    step "torch reference" 120 bench.log python3 bench/cuda/torch_moe_reference.py --routing-dir /tmp/grace_routing \
        --out "$LOGS/torch_ref.json"
    step "combine" 30 bench.log python3 bench/cuda/combine.py "$LOGS"

    # 5. compute-sanitizer memcheck on the GPU tests (all but the model shapes) and the NCCL tests.
    step "memcheck grace_cuda_tests" 100 memcheck.log $MPIRUN compute-sanitizer --tool memcheck --leak-check full \
        $BUILD/tests/cuda/grace_cuda_tests --gtest_filter='-GpuMoeLayer.Olmoe*:GpuMoeLayer.Qwen3*:GpuMoeLayer.SmallShapeEverySchemeAndPolicy2x2'
    step "memcheck grace_nccl_tests" 60 memcheck.log $MPIRUN compute-sanitizer --tool memcheck --leak-check full \
        $BUILD/tests/cuda/grace_nccl_tests
fi

{
    echo "== summary (wall $(( $(date +%s) - T0 )) s, budget $BUDGET s)"
    for s in "${SUMMARY[@]}"; do echo "$s"; done
    grep -hE "verify max_rel_err|passed|FAILED" "$LOGS/grace_run.log" | grep -E "grace run:|FAILED" | head -20
    [[ -f $LOGS/model_shapes.log ]] && grep -hE "max rel L2|OK \]|FAILED|PASSED" "$LOGS/model_shapes.log"
    [[ -f $LOGS/memcheck.log ]] && grep -hE "ERROR SUMMARY|LEAK SUMMARY|PASSED|FAILED" "$LOGS/memcheck.log"
} 2>&1 | tee "$LOGS/summary.txt"
cp "$LOGS/summary.txt" "$OUT/summary.txt"
pack
