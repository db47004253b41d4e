#!/usr/bin/env bash
# grace replan on the real GPT-OSS-20B traces: plan on mmlu_test, evaluate on mmlu_pro_test the plan as it is, a
# full re-plan on mmlu_pro_test, and a re-plan that rewrites at most 25% of the instances (docs/planning.md).
# Usage: bash bench/replan_gpt_oss.sh [GRACE_BIN] [WORK_DIR]
set -euo pipefail
G=${1:-build/tools/grace/grace}
W=${2:-$(mktemp -d)}
mkdir -p "$W"
D=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/real/gpt-oss-20b-routing
for topo in 2x4 4x8; do
  for ds in mmlu_test mmlu_pro_test; do "$G" profile "$D/$ds.npy" --topology "$topo" -q -o "$W/st_${ds}_$topo" >/dev/null; done
  n=$(( ${topo%x*} * ${topo#*x} )); S=$(( (32 + n - 1) / n + 1 ))
  "$G" plan --stats "$W/st_mmlu_test_$topo" --topology "$topo" --slots-per-gpu "$S" -q -o "$W/pA_$topo.json" >/dev/null
  "$G" plan --stats "$W/st_mmlu_pro_test_$topo" --topology "$topo" --slots-per-gpu "$S" -q -o "$W/pB_$topo.json" >/dev/null
  "$G" replan --plan "$W/pA_$topo.json" --stats "$W/st_mmlu_pro_test_$topo" --max-moves-fraction 0.25 -q \
    -o "$W/pR_$topo.json"
  for p in pA pB pR; do
    echo "$topo $p $("$G" eval --trace "$D/mmlu_pro_test.npy" --plan "$W/${p}_$topo.json" --comm hsc -o "$W/e_${p}_$topo" | grep end-to-end)"
  done
done
