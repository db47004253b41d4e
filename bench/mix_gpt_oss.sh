#!/usr/bin/env bash
# Domain shift on the real GPT-OSS-20B traces with a mixed profile or a robust (window-quantile) plan
# (docs/planning.md, "Mixed and robust profiles"). Evaluation traffic: mmlu_pro_test without its first 10% of
# tokens ("rest"). Plans from:
#   A        mmlu_test alone (the shifted plan)
#   mix      mmlu_test + the first 10% of mmlu_pro_test ("head"), weighted by tokens (head = 2.6% of the mix)
#   mix11    the same two with --mix 1,1 (head = half the mix)
#   mixS11   mmlu_test + a 10% sample spread over mmlu_pro_test (every 10th block of 256 tokens), --mix 1,1;
#            evaluated on the other 90% ("spread rest"), not on "rest"
#   rob.75   mmlu_test alone, --window-tokens 2048, grace plan --robust 0.75 (rob.9, rob1: --robust 0.9, 1)
#   B        mmlu_pro_test itself (all of it: the in-domain reference of issue #13)
#   Brest    exactly the evaluated tokens (rest)
# Second table, how far a held-out in-domain profile gets: mmlu_pro_test split into halves by blocks of 256 tokens
# (blocks 0-4 of every 10 -> "half", blocks 5-9 -> "other half"); plans from A, "half" alone, mmlu_test + half
# (by tokens) and B, all evaluated on the other half.
# No profiled token of mmlu_pro_test is evaluated except in B (and Brest). Slot-exact plans with S = ceil(32/G)+1,
# `grace eval --comm hsc`, a100-testbed, end-to-end estimate in ms.
# Usage: bash bench/mix_gpt_oss.sh [GRACE_BIN] [WORK_DIR]
set -euo pipefail
G=${1:-build/tools/grace/grace}
W=${2:-$(mktemp -d)}
mkdir -p "$W"
D=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/real/gpt-oss-20b-routing
# Slices of mmlu_pro_test (ids only; the gate weights are not used by profile, plan or eval).
/usr/bin/python3 - "$D" "$W" <<'EOF'
import json, sys
import numpy as np
src, out = sys.argv[1], sys.argv[2]
ids = np.load(f"{src}/mmlu_pro_test.npy")
T = ids.shape[0]
head = np.arange(T) < T // 10
spread = (np.arange(T) // 256) % 10 == 0
half = (np.arange(T) // 256) % 10 < 5
for name, keep in [("head", head), ("rest", ~head), ("spread", spread), ("spread_rest", ~spread), ("half", half),
                   ("other_half", ~half)]:
    np.save(f"{out}/{name}.npy", ids[keep])
    meta = {"format": "grace.trace/v1", "num_experts": 32, "top_k": 4, "num_layers": 24, "model": "gpt-oss-20b",
            "dataset": f"mmlu_pro_test:{name}"}
    json.dump(meta, open(f"{out}/{name}.json", "w"))
    print(f"{name}: {int(keep.sum())} of {T} mmlu_pro_test tokens")
EOF
ev() { "$G" eval --trace "$2" --plan "$1" --comm hsc -o "$W/e_tmp" | awk '/end-to-end/ {print $3}'; }
echo "| topology | A | mix | mix11 | rob.75 | rob.9 | rob1 | B | Brest | mixS11 (on spread rest) | B (on spread rest) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for topo in 2x2 2x4 4x4 4x8; do
  n=$(( ${topo%x*} * ${topo#*x} )); S=$(( (32 + n - 1) / n + 1 ))
  prof() { local name=$1; shift; "$G" profile "$@" --topology "$topo" -q -o "$W/st_${name}_$topo" >/dev/null; }
  prof A "$D/mmlu_test.npy" --window-tokens 2048
  prof mix "$D/mmlu_test.npy" "$W/head.npy"
  prof mix11 "$D/mmlu_test.npy" "$W/head.npy" --mix 1,1
  prof mixS11 "$D/mmlu_test.npy" "$W/spread.npy" --mix 1,1
  prof B "$D/mmlu_pro_test.npy"
  prof Brest "$W/rest.npy"
  plan() { "$G" plan --stats "$W/st_${1}_$topo" --topology "$topo" --slots-per-gpu "$S" -q -o "$W/p_${2:-$1}_$topo.json" \
    "${@:3}" >/dev/null; }
  for p in A mix mix11 mixS11 B Brest; do plan "$p"; done
  plan A rob.75 --robust 0.75
  plan A rob.9 --robust 0.9
  plan A rob1 --robust 1
  row="| $topo"
  for p in A mix mix11 rob.75 rob.9 rob1 B Brest; do row="$row | $(ev "$W/p_${p}_$topo.json" "$W/rest.npy")"; done
  for p in mixS11 B; do row="$row | $(ev "$W/p_${p}_$topo.json" "$W/spread_rest.npy")"; done
  echo "$row |"
done
echo
echo "evaluated on the other half:"
echo "| topology | A | half | mmlu_test + half | B |"
echo "|---|---|---|---|---|"
for topo in 2x2 2x4 4x4 4x8; do
  n=$(( ${topo%x*} * ${topo#*x} )); S=$(( (32 + n - 1) / n + 1 ))
  "$G" profile "$W/half.npy" --topology "$topo" -q -o "$W/st_half_$topo" >/dev/null
  "$G" profile "$D/mmlu_test.npy" "$W/half.npy" --topology "$topo" -q -o "$W/st_mixhalf_$topo" >/dev/null
  row="| $topo"
  for p in A half mixhalf B; do
    "$G" plan --stats "$W/st_${p}_$topo" --topology "$topo" --slots-per-gpu "$S" -q -o "$W/p_h_${p}_$topo.json" >/dev/null
    row="$row | $(ev "$W/p_h_${p}_$topo.json" "$W/other_half.npy")"
  done
  echo "$row |"
done
