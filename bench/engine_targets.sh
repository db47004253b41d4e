#!/usr/bin/env bash
# Issue #12's targets: "EPLB in SGLang", "GRACE in SGLang" (static dispatch, no hook) and "GRACE native" (TAR + HSC,
# what the routing hook gives) on generated olmoe and qwen3-30b-a3b traces and the real GPT-OSS-20B traces (planned on
# mmlu_test, evaluated on mmlu_pro_test), topologies 2x4 and 4x8, slots ceil(E/G) + 1 and + 2. Prints one table row
# per cell (priced MoE-layer time, ms, a100-testbed). Usage: bash bench/engine_targets.sh [GRACE_BIN] [WORK_DIR] [ENGINE]
set -euo pipefail
G=${1:-build/tools/grace/grace}
W=${2:-$(mktemp -d)}
ENGINE=${3:-sglang}
mkdir -p "$W"
D=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/real/gpt-oss-20b-routing
"$G" gen --preset olmoe --tokens 16384 --seed 7 -o "$W/olmoe.npy" >/dev/null
"$G" gen --preset qwen3-30b-a3b --tokens 16384 --seed 7 -o "$W/qwen3.npy" >/dev/null
echo "| trace | topology:slots | EPLB in $ENGINE | GRACE in $ENGINE | GRACE native | GRACE in $ENGINE vs EPLB | native vs EPLB |"
echo "|---|---|---|---|---|---|---|"
for model in olmoe qwen3 gpt-oss; do
  case $model in
    olmoe) E=64; args=(--trace "$W/olmoe.npy") ;;
    qwen3) E=128; args=(--trace "$W/qwen3.npy") ;;
    gpt-oss) E=32; args=(--trace "$D/mmlu_pro_test.npy" --profile-trace "$D/mmlu_test.npy") ;;
  esac
  for topo in 2x4 4x8; do
    n=$(( ${topo%x*} * ${topo#*x} ))
    for extra in 1 2; do
      S=$(( (E + n - 1) / n + extra ))
      out="$W/cmp_${model}_${topo}_$S"
      "$G" compare "${args[@]}" --topology "$topo" --engine "$ENGINE" --slots-per-gpu "$S" -o "$out" >/dev/null
      /usr/bin/python3 - "$out/compare.json" "$model" "$topo:$S" "$ENGINE" <<'PY'
import json, sys
path, model, cell, engine = sys.argv[1:]
rows = {e["name"]: e for e in json.load(open(path))["entries"]}
def t(name):
    return rows[name]["total"]["moe_layer_time_s"] * 1e3
e, g, n = t(f"EPLB in {engine}"), t(f"GRACE in {engine}"), t("GRACE native")
print(f"| {model} | {cell} | {e:.2f} | {g:.2f} | {n:.2f} | {100 * (g - e) / e:+.2f}% | {100 * (n - e) / e:+.2f}% |")
PY
    done
  done
done
