#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 machine, as root.
#   bash scripts/setup.sh demo   install what is missing, build, run the main job (`grace demo`)
#   bash scripts/setup.sh test   install what is missing, build, run every test (plus an ASan/UBSan build)
set -euo pipefail
mode=${1:-demo}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(build-essential cmake ninja-build pkg-config libeigen3-dev libspectra-dev nlohmann-json3-dev libcli11-dev
          libgtest-dev libgmock-dev libbenchmark-dev libopenmpi-dev openmpi-bin libmetis-dev pybind11-dev python3-dev
          python3-numpy python3-matplotlib)
# python3-torch: the engine-hook and grace.hf tests; python3-venv/-pip/-setuptools/-wheel: the pip-install test
[ "$mode" = test ] && packages+=(chromium python3-torch python3-venv python3-pip python3-setuptools python3-wheel)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

jobs=$(nproc)
build() {  # build DIR [cmake args...]; BUILD_TARGET (optional) limits what is built
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$dir" -j "$jobs" ${BUILD_TARGET:+--target "$BUILD_TARGET"}
}

case "$mode" in
  demo)
    BUILD_TARGET=grace build build   # the tool alone; the tests and benchmarks are the test job's
    ./build/tools/grace/grace demo -o out/demo
    ;;
  test)
    # Where nvcc exists (CI has it, without a GPU) the CUDA backend is built too; its GPU tests skip there.
    cuda=()
    if command -v nvcc >/dev/null 2>&1; then cuda=(-DGRACE_USE_CUDA=ON); fi
    build build "${cuda[@]}"
    (cd build && ctest --output-on-failure -j "$jobs" --timeout 1200)
    # Second pass with AddressSanitizer + UBSan over the unit tests (the NumPy and MPI suites are covered above).
    build build-asan -DGRACE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGRACE_BUILD_BENCH=OFF \
          -DGRACE_BUILD_PYTHON=OFF -DGRACE_USE_MPI=OFF
    (cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
       ctest --output-on-failure -j "$jobs" --timeout 1200 -R '^[A-Z]')
    ;;
  *)
    echo "usage: bash scripts/setup.sh demo|test" >&2; exit 2 ;;
esac
