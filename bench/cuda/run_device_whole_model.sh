#!/usr/bin/env bash
# One device call: build grace with CUDA (the Python module, grace.ep's CUDA backend included), then
# bench/torch/whole_model.py: each supported MoE architecture at its published shape (random weights, bf16, layers
# trimmed to a weight budget), prefill + greedy decode with the stock transformers blocks and with grace.hf.patch.
# Usage on the device (repository root): OUT=$OUT bash bench/cuda/run_device_whole_model.sh
#   GRACE_WM_BUDGET_S (default 570): wall-clock budget of the whole script (the device allows 600 s a call); the
#     Python run gets what the build left. It writes its JSON/markdown after every architecture, so a run cut
#     short still brings back the finished ones.
#   GRACE_WM_ARGS: extra arguments of whole_model.py (e.g. "--archs olmoe,gpt_oss --shapes 256x128+16").
# Six architectures may not fit one 10-minute call: split them over two calls on the warm machine (build-wm/ is
# kept, so the second build is a no-op), e.g. GRACE_WM_ARGS="--archs olmoe,qwen3_moe,mixtral" then
# GRACE_WM_ARGS="--archs deepseek_v2_lite,gpt_oss,qwen2_moe" with another OUT sub-folder.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
# The device image lacks Debian's header-only Spectra: carry its .deb in .deps/ (git-ignored) and unpack it here.
for f in .deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
PY=$(command -v python3)
T0=$(date +%s)
cmake -S . -B build-wm -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRACE_USE_CUDA=ON -DGRACE_BUILD_BENCH=OFF \
  -DGRACE_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DPython3_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" 2>&1 | grep -iE "error|warn" | tee "$OUT/configure.log"
cmake --build build-wm -j16 2>&1 | tail -3 | tee "$OUT/build.log"
echo "build: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/build.log"
ls build-wm/python/grace/*.so | tee -a "$OUT/build.log"
PYTHONPATH=$PWD/build-wm/python $PY -c 'import grace, grace.hf, grace.ep; print("grace", grace.__version__, "ep", grace.ep.__file__)' \
  2>&1 | tee "$OUT/import.log"
LEFT=$(( ${GRACE_WM_BUDGET_S:-570} - ($(date +%s) - T0) - 15 ))
echo "whole_model.py: ${LEFT} s left" | tee -a "$OUT/build.log"
if (( LEFT < 30 )); then echo "no time left for whole_model.py: rerun on the warm machine (the build is kept)"; exit 1; fi
PYTHONPATH=$PWD/build-wm/python timeout --kill-after=10 "$LEFT" \
  $PY bench/torch/whole_model.py --out "$OUT" ${GRACE_WM_ARGS:-} 2>&1 | tee "$OUT/whole_model.log" | tail -40
echo "whole_model.py exit ${PIPESTATUS[0]}; total $(( $(date +%s) - T0 )) s"
