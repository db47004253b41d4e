#!/usr/bin/env bash
# Side by side, in one run: `grace plan --threads 1` of two binaries (e.g. before/after a change) on statistics
# folders, interleaved, each RUNS times; prints the minimum process CPU time (user + sys, from /usr/bin/time)
# and the minimum of the wall time `grace plan` reports for planning alone, per binary and folder, and whether
# the two plans place every expert identically.
# Usage: bench/plan_side_by_side.sh OLD_GRACE NEW_GRACE TOPOLOGY RUNS STATS_DIR...
# Statistics at any shape: bench/make_synthetic_stats.py.
set -euo pipefail
OLD=$1 NEW=$2 TOPO=$3 RUNS=$4
shift 4
PY=/usr/bin/python3
work=$(mktemp -d /tmp/grace_plan_sbs.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| stats | E | L | old CPU s | new CPU s | old plan wall s | new plan wall s | same placement |"
echo "|---|---|---|---|---|---|---|---|"
for stats in "$@"; do
  declare -A cpu=() wall=()
  for _ in $(seq "$RUNS"); do
    for tag in old new; do
      bin=$OLD; [ "$tag" = new ] && bin=$NEW
      out=$( { /usr/bin/time -f "CPU %U %S" "$bin" plan --stats "$stats" --topology "$TOPO" --threads 1 -q \
               -o "$work/$tag.json"; } 2>&1 )
      c=$(echo "$out" | awk '/^CPU/ {print $2 + $3}')
      w=$(echo "$out" | sed -n 's/.* in \([0-9.]*\) s.*/\1/p')
      cpu[$tag]=$($PY -c "print(min(float('$c'), float('${cpu[$tag]:-1e9}')))")
      wall[$tag]=$($PY -c "print(min(float('$w'), float('${wall[$tag]:-1e9}')))")
    done
  done
  read -r E L < <($PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['num_experts'], m['num_layers'])" \
                    "$stats/meta.json")
  same=$($PY -c "
import json, sys
a, b = (json.load(open(p))['layers'] for p in sys.argv[1:3])
print(sum(x['primary_gpu'] == y['primary_gpu'] and x['gpu_experts'] == y['gpu_experts'] for x, y in zip(a, b)), '/', len(a))
" "$work/old.json" "$work/new.json")
  echo "| $(basename "$stats") | $E | $L | ${cpu[old]} | ${cpu[new]} | ${wall[old]} | ${wall[new]} | $same |"
  unset cpu wall
done
