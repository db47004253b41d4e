#!/usr/bin/env bash
# Side by side, in one run: `grace eval` of two binaries (e.g. before/after a change) on one trace and plan,
# interleaved, RUNS times per thread count; prints the minimum process CPU time (user + sys, /usr/bin/time),
# the token-layer decisions per CPU-second it gives, and whether the two binaries' reports (.json and .csv) are
# byte-identical, for --threads 1 and 2 (and across the two thread counts).
# Usage: bench/eval_side_by_side.sh OLD_GRACE NEW_GRACE TRACE.npy PLAN.json RUNS [COMM]
set -euo pipefail
OLD=$1 NEW=$2 TRACE=$3 PLAN=$4 RUNS=$5 COMM=${6:-hsc}
PY=/usr/bin/python3
work=$(mktemp -d /tmp/grace_eval_sbs.XXXXXX)
trap 'rm -rf "$work"' EXIT
read -r T L < <($PY -c "import numpy as np, sys; s = np.load(sys.argv[1], mmap_mode='r').shape; print(s[0], s[1])" "$TRACE")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "trace: $TRACE (T = $T tokens, L = $L layers), plan: $PLAN, --comm $COMM, best of $RUNS"
cat "$TRACE" > /dev/null  # page cache
echo "| threads | old CPU s | new CPU s | old M decisions / CPU-s | new M decisions / CPU-s | reports identical |"
echo "|---|---|---|---|---|---|"
for threads in 1 2; do
  declare -A best=()
  for _ in $(seq "$RUNS"); do
    for tag in old new; do
      bin=$OLD; [ "$tag" = new ] && bin=$NEW
      c=$( { /usr/bin/time -f "CPU %U %S" "$bin" eval --trace "$TRACE" --plan "$PLAN" --comm "$COMM" \
             --threads "$threads" -o "$work/$tag$threads" > /dev/null; } 2>&1 | awk '/^CPU/ {print $2 + $3}')
      best[$tag]=$($PY -c "print(min(float('$c'), float('${best[$tag]:-1e9}')))")
    done
  done
  same=no
  cmp -s "$work/old$threads.json" "$work/new$threads.json" && cmp -s "$work/old$threads.csv" "$work/new$threads.csv" &&
    cmp -s "$work/new1.json" "$work/new$threads.json" && same=yes
  rate() { $PY -c "print('%.1f' % ($T * $L / float('$1') / 1e6))"; }
  echo "| $threads | ${best[old]} | ${best[new]} | $(rate "${best[old]}") | $(rate "${best[new]}") | $same |"
  unset best
done
