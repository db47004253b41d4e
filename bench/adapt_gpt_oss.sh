#!/usr/bin/env bash
# Online adaptation on the real GPT-OSS-20B traces (issue #13 item 3, docs/planning.md): plan on mmlu_test, evaluate
# on mmlu_pro_test as planned and with grace eval --adapt N (WRR weights re-predicted every N batches of B tokens per
# GPU), against planning on mmlu_pro_test itself. Prints one markdown row per topology: end-to-end ms and the gap
# to the in-domain plan. Usage: bash bench/adapt_gpt_oss.sh [GRACE_BIN] [WORK_DIR]
# Environment: TOPOS (default "2x2 2x4 4x4 4x8"), NS (default "1 4 16"), B (default 32), DECAY (default 0),
# SLOTS=1 for slot-exact plans (--slots-per-gpu ceil(32 / G) + 1, as bench/replan_gpt_oss.sh).
set -euo pipefail
G=${1:-build/tools/grace/grace}
W=${2:-$(mktemp -d)}
mkdir -p "$W"
D=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/real/gpt-oss-20b-routing
TOPOS=${TOPOS:-"2x2 2x4 4x4 4x8"}
NS=${NS:-"1 4 16"}
B=${B:-32}
DECAY=${DECAY:-0}
SLOTS=${SLOTS:-0}
e2e() { "$G" eval --trace "$D/mmlu_pro_test.npy" --comm hsc "$@" | awk '/end-to-end/ {print $3}'; }
gap() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%+.2f%%", (a / b - 1) * 100}'; }
head="| topology | in-domain plan (ms) | cross-domain plan (ms) | gap"
for n in $NS; do head="$head | --adapt $n (ms) | gap"; done
echo "$head |"
echo "|$(printf -- '---|%.0s' $(seq 1 $(( 4 + 2 * $(echo $NS | wc -w) ))))"
for topo in $TOPOS; do
  slots=()
  if [ "$SLOTS" = 1 ]; then n=$(( ${topo%x*} * ${topo#*x} )); slots=(--slots-per-gpu $(( (32 + n - 1) / n + 1 ))); fi
  for ds in mmlu_test mmlu_pro_test; do
    "$G" profile "$D/$ds.npy" --topology "$topo" -q -o "$W/st_${ds}_$topo" >/dev/null
    "$G" plan --stats "$W/st_${ds}_$topo" --topology "$topo" "${slots[@]}" -q -o "$W/p_${ds}_$topo.json" >/dev/null
  done
  in=$(e2e --plan "$W/p_mmlu_pro_test_$topo.json" -o "$W/e_in_$topo")
  cross=$(e2e --plan "$W/p_mmlu_test_$topo.json" -o "$W/e_cross_$topo")
  row="| $topo | $in | $cross | $(gap "$cross" "$in")"
  for n in $NS; do
    a=$(e2e --plan "$W/p_mmlu_test_$topo.json" --adapt "$n" --adapt-batch-tokens "$B" --adapt-decay "$DECAY" \
      -o "$W/e_adapt${n}_$topo")
    row="$row | $a | $(gap "$a" "$in")"
  done
  echo "$row |"
done
