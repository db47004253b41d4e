#!/usr/bin/env bash
# Flat vs flat-dedup vs HSC over a real, slow cross-node link.
#
# Two "nodes" are two network namespaces made here (`ip netns add`), each with its own UTS namespace (own host
# name, so Open MPI's per-host shared-memory segments and session dirs do not collide), joined by a veth pair whose
# two directions are rate-limited with `tc ... tbf`. Open MPI runs 2 ranks per namespace: shared memory (vader)
# inside a node, TCP over the veth between nodes. mpirun runs in node 0's namespace and starts node 1's orted
# through an rsh agent (written here) that does `ip netns exec <ns> unshare --uts sh -c "hostname ...; <cmd>"`.
#
# Usage (root): bench/netns/run_slow_link.sh [OUT_DIR]        (default OUT_DIR: slow-link-out)
# Environment (defaults): BUILD=build RATE=1gbit (tbf rate per direction, or "none") BURST=256kb
#   TOKENS=4096 (trace tokens; 1/4 per rank) LAYERS=2 BATCH=256 (tokens per rank per forward) REPEATS=3
#   INTER=128 (expert intermediate size; H=2048 from the olmoe preset) BENCH_TOKENS=256 BENCH_ITERS=10
#   RUN_TIMEOUT=300 (seconds per mpirun) SKIP_BENCH=0 (1: skip bench_dispatch) QUICK=0 (1: tiny shapes, for ctest)
# Exit: 0 ok, 77 if network namespaces / veth / tc are not available here (nothing was changed), else failure.
# Everything this script creates (namespaces, veth, temp dir, the processes inside the namespaces) is removed on
# exit, also on failure or Ctrl-C (trap).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-slow-link-out}
BUILD=${BUILD:-build}
RATE=${RATE:-1gbit}
BURST=${BURST:-256kb}
TOKENS=${TOKENS:-4096}
LAYERS=${LAYERS:-2}
BATCH=${BATCH:-256}
REPEATS=${REPEATS:-3}
INTER=${INTER:-128}
HIDDEN=${HIDDEN:-}
BENCH_TOKENS=${BENCH_TOKENS:-256}
BENCH_ITERS=${BENCH_ITERS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
SKIP_BENCH=${SKIP_BENCH:-0}
PY=${PY:-/usr/bin/python3}

case "$BUILD" in /*) ;; *) BUILD="$SRC/$BUILD" ;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
GRACE="$BUILD/tools/grace/grace"
BENCH_DISPATCH="$BUILD/bench/mpi/bench_dispatch"
PINGPONG="$BUILD/bench/mpi/bench_pingpong"

skip() { echo "run_slow_link: SKIP: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (ip netns, tc)"
for t in ip tc unshare mpirun timeout; do command -v "$t" >/dev/null || skip "'$t' not found"; done
[ -x "$GRACE" ] || { echo "run_slow_link: $GRACE not built" >&2; exit 1; }

TAG=$$
NSA="grace_n0_$TAG" NSB="grace_n1_$TAG"
VA="gv0_$TAG" VB="gv1_$TAG"
IPA=10.77.0.1 IPB=10.77.0.2 NET=10.77.0.0/24
WORK=$(mktemp -d /tmp/grace-slowlink.XXXXXX)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for ns in "$NSA" "$NSB"; do
        if ip netns list 2>/dev/null | grep -qw "$ns"; then
            # Only processes inside our own namespaces (left over if a run timed out), by pid.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    ip link del "$VA" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the two nodes -------------------------------------------------------------------------------------------
ip netns add "$NSA" 2>"$WORK/err" || skip "ip netns add failed: $(cat "$WORK/err")"
ip netns add "$NSB" 2>"$WORK/err" || skip "ip netns add failed: $(cat "$WORK/err")"
ip link add "$VA" type veth peer name "$VB" 2>"$WORK/err" || skip "veth not available: $(cat "$WORK/err")"
ip link set "$VA" netns "$NSA"
ip link set "$VB" netns "$NSB"
ip -n "$NSA" link set lo up
ip -n "$NSB" link set lo up
ip -n "$NSA" addr add "$IPA/24" dev "$VA"
ip -n "$NSB" addr add "$IPB/24" dev "$VB"
ip -n "$NSA" link set "$VA" up
ip -n "$NSB" link set "$VB" up
if [ "$RATE" != none ]; then
    # tbf on the egress of both veth ends: node0 -> node1 and node1 -> node0 each get RATE.
    ip netns exec "$NSA" tc qdisc add dev "$VA" root tbf rate "$RATE" burst "$BURST" latency 100ms 2>"$WORK/err" ||
        skip "tc tbf not available: $(cat "$WORK/err")"
    ip netns exec "$NSB" tc qdisc add dev "$VB" root tbf rate "$RATE" burst "$BURST" latency 100ms
fi

cat >"$WORK/rsh_agent.sh" <<EOF
#!/bin/sh
# Open MPI's plm_rsh_agent: \$1 = host, the rest = the command (orted ...) to run there.
host=\$1; shift
case "\$host" in
  $IPA) ns=$NSA; hn=grace-node0 ;;
  $IPB) ns=$NSB; hn=grace-node1 ;;
  *) echo "rsh agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$hn && \$*"
EOF
chmod +x "$WORK/rsh_agent.sh"
printf '%s slots=2\n%s slots=2\n' "$IPA" "$IPB" >"$WORK/hosts"

# Four processes on however many cores: yield when idle so that polling ranks do not starve the TCP stack;
# preconnect so that the first forward does not pay for opening the TCP connections.
MPIRUN=(mpirun --allow-run-as-root --hostfile "$WORK/hosts" -n 4 --map-by slot
    --mca plm_rsh_agent "$WORK/rsh_agent.sh" --mca btl tcp,self,vader
    --mca btl_tcp_if_include "$NET" --mca oob_tcp_if_include "$NET"
    --mca btl_vader_single_copy_mechanism none --mca mpi_yield_when_idle 1 --mca mpi_preconnect_mpi 1)

# Runs "$@" on the 2x2 job from node 0's namespace; bounded by RUN_TIMEOUT.
in_job() {
    timeout -k 10 "$RUN_TIMEOUT" ip netns exec "$NSA" unshare --uts \
        sh -c 'hostname grace-node0 && exec "$@"' sh "${MPIRUN[@]}" "$@"
}
veth_tx() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/tx_bytes"; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(lscpu | grep 'Model name' | sed 's/ *Model name: *//'), $(nproc) cores"
    echo "kernel: $(uname -r)"
    echo "mpirun: $(mpirun --version 2>&1 | head -1)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "link: veth $VA ($NSA, $IPA) <-> $VB ($NSB, $IPB), tbf rate=$RATE burst=$BURST per direction"
    echo "mpirun: ${MPIRUN[*]}"
} | tee "$OUT/machine.txt"

# --- trace and plan (no MPI) --------------------------------------------------------------------------------
if [ "${QUICK:-0}" = 1 ]; then
    TOKENS=256 LAYERS=1 BATCH=64 REPEATS=1 INTER=16 HIDDEN=${HIDDEN:-256} SKIP_BENCH=1
fi
"$GRACE" gen --preset olmoe --tokens "$TOKENS" --layers "$LAYERS" --seed 1 --threads 1 -o "$OUT/trace.npy" >/dev/null
"$GRACE" plan --trace "$OUT/trace.npy" --topology 2x2 --method grace -q --threads 1 -o "$OUT/plan.json" >/dev/null

# --- the link ------------------------------------------------------------------------------------------------
if [ -x "$PINGPONG" ]; then
    in_job "$PINGPONG" 2 | tee "$OUT/pingpong.md"
else
    echo "run_slow_link: $PINGPONG not built (GRACE_BUILD_BENCH off?): no link measurement" >&2
fi

# --- grace run per scheme, interleaved so that load drift hits every scheme alike ---------------------------
HFLAG=()
[ -n "$HIDDEN" ] && HFLAG=(--hidden "$HIDDEN")
: >"$OUT/veth.tsv"
for rep in $(seq 1 "$REPEATS"); do
    for scheme in flat flat-dedup hsc; do
        a0=$(veth_tx "$NSA" "$VA") b0=$(veth_tx "$NSB" "$VB")
        in_job "$GRACE" run --plan "$OUT/plan.json" --trace "$OUT/trace.npy" --comm "$scheme" --preset olmoe \
            "${HFLAG[@]}" --intermediate "$INTER" --batch-tokens "$BATCH" --layers "$LAYERS" \
            -o "$OUT/run_${scheme}_${rep}.json" >"$OUT/run_${scheme}_${rep}.log" 2>&1 ||
            { cat "$OUT/run_${scheme}_${rep}.log" >&2; exit 1; }
        a1=$(veth_tx "$NSA" "$VA") b1=$(veth_tx "$NSB" "$VB")
        printf '%s\t%s\t%s\n' "$scheme" "$rep" "$((a1 - a0 + b1 - b0))" >>"$OUT/veth.tsv"
        echo "run $rep $scheme: veth bytes $((a1 - a0 + b1 - b0))"
    done
done

if [ "$SKIP_BENCH" != 1 ] && [ -x "$BENCH_DISPATCH" ]; then
    in_job "$BENCH_DISPATCH" 2x2 "$BENCH_TOKENS" "$BENCH_ITERS" | tee "$OUT/bench_dispatch.md"
fi
ip netns exec "$NSA" tc -s qdisc show dev "$VA" >"$OUT/tc_stats.txt"
ip netns exec "$NSB" tc -s qdisc show dev "$VB" >>"$OUT/tc_stats.txt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

"$PY" "$SRC/bench/netns/summarize.py" "$OUT" | tee "$OUT/summary.md"
