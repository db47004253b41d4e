#!/usr/bin/env bash
# Side by side, on one machine and one trace file: grace's profiler (threads 1 and 2, end to end from the file,
# as `grace profile` runs it) against the best vectorized NumPy version (bench/profile_numpy.py).
# Also compute only (trace already in memory): bench/bm_profile (same trace, generated in process) against the
# NumPy compute time.
# Usage: bench/profile_side_by_side.sh [GRACE_BIN] [TOKENS] [PRESET] [WORKDIR] [BM_PROFILE_BIN]
set -euo pipefail
GRACE=${1:-build/tools/grace/grace}
TOKENS=${2:-1000000}
PRESET=${3:-qwen3-30b-a3b}
WORK=${4:-$(mktemp -d /tmp/grace_bench.XXXXXX)}
BM=${5:-$(dirname "$GRACE")/../../bench/bm_profile}
mkdir -p "$WORK"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3
trace="$WORK/trace.npy"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
if [ ! -f "$trace" ]; then
  "$GRACE" gen --preset "$PRESET" --dataset wikitext --tokens "$TOKENS" --seed 1 --no-weights -o "$trace"
fi
E=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['num_experts'])" "$WORK/trace.json")
cat "$trace" > /dev/null  # warm the page cache so every contender reads from memory
secs() { $PY -c "import re,sys; print(re.search(r' in ([0-9.]+) s', sys.stdin.read()).group(1))"; }
best_of() {  # best of 3 runs of `grace profile` with N threads
  local best=""
  for _ in 1 2 3; do
    s=$("$GRACE" profile "$trace" -q --threads "$1" -o "$WORK/stats$1" | secs)
    best=$($PY -c "print(min(float('$s'), float('${best:-1e9}')))")
  done
  echo "$best"
}
t1=$(best_of 1)
t2=$(best_of 2)
echo "grace profile --threads 1: $t1 s"
echo "grace profile --threads 2: $t2 s"
out=$($PY "$HERE/profile_numpy.py" "$trace" --experts "$E" --check "$WORK/stats2")
echo "$out"
tn=$(echo "$out" | sed -n 's/.*total \([0-9.]*\) s.*/\1/p')
tc=$(echo "$out" | sed -n 's/.*compute \([0-9.]*\) s.*/\1/p')
$PY -c "print('end to end (read + count), NumPy / grace: threads=1 %.1fx, threads=2 %.1fx' % ($tn / $t1, $tn / $t2))"
if [ -x "$BM" ] && [ "$PRESET" = qwen3-30b-a3b ]; then
  # Median of 3 repetitions of each thread count; real_time is in milliseconds.
  GRACE_BENCH_TOKENS=$TOKENS "$BM" --benchmark_filter='BM_Profile/qwen3/' --benchmark_repetitions=3 \
    --benchmark_report_aggregates_only=true --benchmark_format=csv 2>/dev/null | grep '_median' |
  while IFS=, read -r name iters real cpu rest; do
    $PY -c "print('compute only (in memory), NumPy %.3f s / grace %s %.3f s = %.1fx' % ($tc, '$name'.strip('\"'), $real / 1e3, $tc / ($real / 1e3)))"
  done
fi
