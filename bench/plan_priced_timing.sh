#!/usr/bin/env bash
# Planning time of the default method (`grace` = priced+priced+tar: candidates priced with the cost model in the
# loop) next to the paper's method (`grace-paper`), with and without a slot count, `--threads 1`, each RUNS times;
# prints the minimum process CPU time (user + sys, /usr/bin/time) and the minimum wall time `grace plan` reports,
# and whether `--threads 2` gives the same bytes.
# Usage: bench/plan_priced_timing.sh GRACE RUNS TOPOLOGY STATS_DIR[:SLOTS] ...
# (statistics: `grace profile TRACE --topology T -o DIR`, or bench/make_synthetic_stats.py at any shape)
set -euo pipefail
G=$1 RUNS=$2 TOPO=$3
shift 3
work=$(mktemp -d /tmp/grace_plan_priced.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| stats | slots | method | CPU s | plan wall s | --threads 2 identical |"
echo "|---|---|---|---|---|---|"
for spec in "$@"; do
  stats=${spec%%:*}
  slots=""
  [ "$spec" != "$stats" ] && slots=${spec#*:}
  extra=()
  [ -n "$slots" ] && extra=(--slots-per-gpu "$slots")
  for method in grace grace-paper; do
    best_cpu=1e9 best_wall=1e9
    for _ in $(seq "$RUNS"); do
      out=$( { /usr/bin/time -f "CPU %U %S" "$G" plan --stats "$stats" --topology "$TOPO" "${extra[@]}" \
               --method "$method" --threads 1 -q -o "$work/p1.json"; } 2>&1 )
      c=$(echo "$out" | awk '/^CPU/ {print $2 + $3}')
      w=$(echo "$out" | sed -n 's/.* in \([0-9.]*\) s.*/\1/p')
      best_cpu=$(awk -v a="$c" -v b="$best_cpu" 'BEGIN {print (a < b) ? a : b}')
      best_wall=$(awk -v a="$w" -v b="$best_wall" 'BEGIN {print (a < b) ? a : b}')
    done
    "$G" plan --stats "$stats" --topology "$TOPO" "${extra[@]}" --method "$method" --threads 2 -q \
      -o "$work/p2.json" >/dev/null 2>&1
    same=no
    cmp -s "$work/p1.json" "$work/p2.json" && same=yes
    echo "| $(basename "$stats") | ${slots:--} | $method | $best_cpu | $best_wall | $same |"
  done
done
