#!/usr/bin/env bash
# grace.ep's CUDA backend on the device (issue #14): build with CUDA and the Python module, print the diagnostics of
# the session-3 import crash (pip torch + our module built with the device's compiler), run the GPU tests of the
# stream phases and tests/device/test_ep_gpu.py, then bench/torch/bm_ep_moe.py. Logs go to $OUT.
#
# Usage on the device (steps, so that each call stays under the 10-minute limit; the build dir survives between
# calls on a warm machine):
#   OUT=$OUT bash bench/cuda/run_device_ep.sh build test     # configure + build, diagnostics, tests
#   OUT=$OUT bash bench/cuda/run_device_ep.sh bench-olmoe    # the benchmark at the olmoe shape, then
#   OUT=$OUT bash bench/cuda/run_device_ep.sh bench-qwen3    # at the qwen3-30b-a3b shape ("bench": both, one call;
#                                                            # may pass the time limit; the JSON is rewritten after
#                                                            # every point, so what ran is kept)
# carry: .deps (the Spectra .deb of run_device_hooks.sh and vllm_fused_moe_ref.py copied from ../shared/bench).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${*:-build test bench}
B=${GRACE_BUILD_DIR:-build-dev}
PY=$(command -v python3)
log() { echo "== $*" | tee -a "$OUT/steps.log"; }

# The module may need the libstdc++ of the compiler that built it (/opt/gcc) rather than the system one that torch
# loads first; when "import torch; import grace" fails and preloading that libstdc++ fixes it, the later steps
# preload it (recorded in $B/preload.txt, which survives between calls; $OUT does not).
preload() { [ -s "$B/preload.txt" ] && cat "$B/preload.txt"; }

for step in $STEPS; do
case $step in
build)
    log "build"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
    cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF \
        -DGRACE_BUILD_PYTHON=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" \
        -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > "$OUT/cmake.log" 2>&1
    echo "cmake rc=$?" | tee -a "$OUT/steps.log"
    grep -iE "error|warn" "$OUT/cmake.log" | head -20
    cmake --build $B -j16 --target grace _grace grace_cuda_tests grace_nccl_tests > "$OUT/build.log" 2>&1
    echo "build rc=$?" | tee -a "$OUT/steps.log"
    grep -E "warning|error" "$OUT/build.log" | head -20
    tail -2 "$OUT/build.log"

    log "diagnostics -> $OUT/diag.txt"
    M=$(ls $B/python/grace/_grace*.so 2>/dev/null | head -1)
    {
        echo "python: $PY $($PY --version 2>&1)"
        echo "pybind11 (build): $($PY -m pybind11 --version 2>&1)"
        grep -E "^(CMAKE_CXX_COMPILER|CMAKE_CUDA_COMPILER|CMAKE_CUDA_HOST_COMPILER|pybind11_DIR):" $B/CMakeCache.txt
        CXX_BIN=$(grep "^CMAKE_CXX_COMPILER:" $B/CMakeCache.txt | cut -d= -f2)
        "$CXX_BIN" --version | head -1
        echo "CXX libstdc++: $("$CXX_BIN" -print-file-name=libstdc++.so.6)"
        $PY -c "import torch, os; c = torch._C
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'file', torch.__file__)
print('torch cxx11 abi', c._GLIBCXX_USE_CXX11_ABI)
for a in ('_PYBIND11_COMPILER_TYPE', '_PYBIND11_STDLIB', '_PYBIND11_BUILD_ABI'): print('torch', a, getattr(c, a, None))
print('libstdc++ mapped after import torch:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l}))" 2>&1
        echo "--- module $M"
        ldd "$M"
        echo "--- pybind11 internals ids (module, torch)"
        strings -a "$M" | grep -m3 "__pybind11_internals_v"
        TP=$($PY -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_python.so'))")
        strings -a "$TP" | grep -m3 "__pybind11_internals_v"
        echo "--- GLIBCXX the module needs (highest)"
        objdump -T "$M" | grep -o "GLIBCXX_[0-9.]*" | sort -uV | tail -2
        echo "--- libraries mapped after 'import torch; import grace._grace' (libstdc++, nccl, cudart, cublas)"
        (cd $B/python && timeout 120 $PY -c "import torch; import grace._grace
print(sorted({l.split()[-1] for l in open('/proc/self/maps') if any(s in l for s in ('libstdc++', 'nccl', 'cudart', 'cublas'))}))") 2>&1 | tail -3
    } > "$OUT/diag.txt" 2>&1
    cat "$OUT/diag.txt" | head -60

    log "import matrix (python3 -X faulthandler), see $OUT/imports.log"
    : > "$B/preload.txt"
    imports() {
        for code in "import grace" "import torch" "import torch; import grace" "import grace; import torch" \
            "import torch; from grace.ep import _cuda; print(_cuda.available())"; do
            echo "--- $1 $code"
            (cd $B/python && env ${1:+LD_PRELOAD=$1} timeout 120 $PY -X faulthandler -c "$code; print('ok')" 2>&1 | tail -25)
            echo "rc=${PIPESTATUS[0]}"
        done
    }
    imports "" > "$OUT/imports.log" 2>&1
    (cd $B/python && timeout 120 $PY -X faulthandler -c "import torch; import grace._grace" > /dev/null 2>&1)
    if [ $? -ne 0 ]; then
        LIB=$(ldd "$M" | awk '/libstdc\+\+/ {print $3}')
        CXX_LIB=$("$(grep "^CMAKE_CXX_COMPILER:" $B/CMakeCache.txt | cut -d= -f2)" -print-file-name=libstdc++.so.6)
        for cand in "$CXX_LIB" "$LIB"; do
            [ -f "$cand" ] || continue
            (cd $B/python && LD_PRELOAD="$cand" timeout 120 $PY -X faulthandler -c "import torch; import grace._grace" \
                > /dev/null 2>&1) && { echo "$cand" > "$B/preload.txt"; break; }
        done
        echo "torch-then-grace failed; preload that works: '$(preload)'" | tee -a "$OUT/steps.log"
        imports "$(preload)" >> "$OUT/imports.log" 2>&1
    fi
    grep -E "^(---|rc=)" "$OUT/imports.log"
    ;;
test)
    log "C++ GPU tests (stream phases, NCCL over a given host communicator, the existing layer tests)"
    (cd $B && timeout 240 ctest -R '(GpuMoeLayerPhases|GpuMoeLayer\.(OneGpu|Rejects|SmallShape)|cuda\.nccl)' \
        --output-on-failure --timeout 200 > "$OUT/gpu_tests.log" 2>&1)
    echo "ctest rc=$?" | tee -a "$OUT/steps.log"
    tail -15 "$OUT/gpu_tests.log"
    log "tests/device/test_ep_gpu.py"
    PRE=$(preload)
    env ${PRE:+LD_PRELOAD=$PRE} GRACE_BUILD_DIR=$B PYTHONUNBUFFERED=1 \
        timeout 300 $PY -X faulthandler tests/device/test_ep_gpu.py > "$OUT/test_ep_gpu.log" 2>&1
    echo "test_ep_gpu rc=$?" | tee -a "$OUT/steps.log"
    tail -30 "$OUT/test_ep_gpu.log"
    ;;
bench | bench-olmoe | bench-qwen3)
    case $step in
        bench-olmoe) SHAPES=olmoe ;;
        bench-qwen3) SHAPES=qwen3-30b-a3b ;;
        *) SHAPES=olmoe,qwen3-30b-a3b ;;
    esac
    log "bench/torch/bm_ep_moe.py --shapes $SHAPES"
    [ -f .deps/vllm_fused_moe_ref.py ] || echo "no .deps/vllm_fused_moe_ref.py: the vLLM columns are skipped"
    PRE=$(preload)
    env ${PRE:+LD_PRELOAD=$PRE} PYTHONUNBUFFERED=1 \
        timeout 540 $PY -X faulthandler bench/torch/bm_ep_moe.py --build $B --shapes $SHAPES \
        --out "$OUT/bm_ep_moe_$step.json" > "$OUT/bm_ep_moe_$step.log" 2>&1
    echo "bench rc=$?" | tee -a "$OUT/steps.log"
    tail -20 "$OUT/bm_ep_moe_$step.log"
    ;;
*)
    echo "unknown step '$step' (build, test, bench, bench-olmoe, bench-qwen3)"; exit 2 ;;
esac
done
