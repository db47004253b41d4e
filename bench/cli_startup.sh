#!/usr/bin/env bash
# Start-up cost of `grace --version` (bench/results/cli.md): for each binary given, one table row with
# CPU time and wall time (perf stat, mean of 100 runs), max RSS (/usr/bin/time -v), instructions executed, the
# dynamic loader's included (valgrind --tool=callgrind; deterministic, so unaffected by other load), and the
# number of shared objects it loads (ldd). Needs perf, valgrind and GNU time.
#   bash bench/cli_startup.sh build/tools/grace/grace [more binaries...]
set -euo pipefail
echo "| binary | CPU ms | wall ms | max RSS MiB | instructions | shared objects | load avg |"
echo "|---|---|---|---|---|---|---|"
for bin in "$@"; do
  "$bin" --version >/dev/null  # warm the page cache
  stats=$(perf stat -r 100 "$bin" --version 2>&1 >/dev/null)
  cpu=$(awk '/task-clock/{print $1}' <<<"$stats")
  wall=$(awk '/time elapsed/{printf "%.2f", $1 * 1000}' <<<"$stats")
  rss=$(/usr/bin/time -v "$bin" --version 2>&1 >/dev/null | awk -F': ' '/Maximum resident/{printf "%.1f", $2 / 1024}')
  ins=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" --version 2>&1 | awk '/Collected/{print $4}')
  libs=$(ldd "$bin" | wc -l)
  echo "| $bin | $cpu | $wall | $rss | $ins | $libs | $(cut -d' ' -f1 /proc/loadavg) |"
done
