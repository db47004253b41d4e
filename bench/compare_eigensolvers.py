#!/usr/bin/python3
"""Dense against partial (Lanczos) eigensolver in spectral grouping: the same plans, or how they differ.

Two grace binaries: OLD (built before the Lanczos solver: every spectral grouping uses the dense solver) and
NEW (Lanczos where E >= 128 and n <= E / 8). For each source it plans with both and prints a Markdown table:
  same layers      layers whose primary placement (primary_gpu) is identical in the two plans
  U gpu / U node   Equation 1 over GPU groups / node groups of the primaries, on the profiled affinity
                   (scripts/plan_quality.py's definition, mean over layers)
  x-ratio dedup    cross-node copies / all copies under flat-dedup with primary routing (`grace eval` on a
                   held-out trace; sources with statistics only have no trace and show "-")
Sources: generator presets olmoe (E = 64) and qwen3-30b-a3b (E = 128) on 2x4 (training trace seed 0 profiled,
test trace seed 1), and synthetic statistics from bench/make_synthetic_stats.py at E = 256 (4x8, DeepSeek-V3
shape) and E = 512 (4x8). Methods: grace (hierarchical grouping) and spectral-full.

Usage: /usr/bin/python3 bench/compare_eigensolvers.py OLD_GRACE NEW_GRACE [--work DIR] [--tokens 16384]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
from plan_quality import run, utilization  # noqa: E402  (same U definition as docs/planning.md)


def x_ratio(grace, trace, plan, out):
    run([grace, "eval", "--trace", trace, "--plan", plan, "--comm", "flat-dedup", "--routing", "primary",
         "--hidden", "4096", "--intermediate", "1376", "-o", out])
    with open(out + ".json") as f:
        return json.load(f)["total"]["cross_node_ratio"]


def compare(old, new, work, title, stats, test_trace, topo, methods):
    N, M = (int(x) for x in topo.split("x"))
    nodes_of_gpu = np.arange(N * M) // M
    aff = np.load(os.path.join(stats, "affinity.npy"))
    rows = []
    for method in methods:
        cells = {}
        primaries = {}
        for tag, grace in (("dense", old), ("lanczos", new)):
            out = os.path.join(work, f"{title}_{method}_{tag}.json".replace(" ", "_"))
            run([grace, "plan", "--stats", stats, "--topology", topo, "--method", method, "--threads", "1", "-q",
                 "-o", out])
            with open(out) as f:
                plan = json.load(f)
            primaries[tag] = [lay["primary_gpu"] for lay in plan["layers"]]
            ug, un = utilization(aff, primaries[tag], nodes_of_gpu)
            xr = x_ratio(new, test_trace, out, out[:-5] + "_eval") if test_trace else None
            cells[tag] = (ug, un, xr)
        same = sum(a == b for a, b in zip(primaries["dense"], primaries["lanczos"]))
        rows.append((method, same, len(primaries["dense"]), cells))
    print(f"\n### {title} (topology {topo})\n")
    print("| method | same layers | U gpu dense / Lanczos | U node dense / Lanczos | x-ratio dedup dense / Lanczos |")
    print("|---|---|---|---|---|")
    for method, same, L, c in rows:
        d, l = c["dense"], c["lanczos"]
        xr = f"{d[2]:.4f} / {l[2]:.4f}" if d[2] is not None else "-"
        print(f"| {method} | {same} / {L} | {d[0]:.4f} / {l[0]:.4f} | {d[1]:.4f} / {l[1]:.4f} | {xr} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--work")
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="grace_eig_")
    os.makedirs(work, exist_ok=True)
    methods = ["grace", "spectral-full+none+primary"]
    for preset in ("olmoe", "qwen3-30b-a3b"):
        train = os.path.join(work, f"{preset}_train.npy")
        test = os.path.join(work, f"{preset}_test.npy")
        stats = os.path.join(work, f"{preset}_stats")
        if not os.path.exists(stats):
            run([a.new, "gen", "--preset", preset, "--tokens", str(a.tokens), "--seed", "0", "--no-weights", "-o",
                 train])
            run([a.new, "gen", "--preset", preset, "--tokens", str(a.tokens), "--seed", "1", "--no-weights", "-o",
                 test])
            run([a.new, "profile", train, "-q", "-o", stats])
        compare(a.old, a.new, work, preset, stats, test, "2x4", methods)
    for E, L in ((256, 58), (512, 8)):
        stats = os.path.join(work, f"synthetic_e{E}")
        if not os.path.exists(stats):
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_stats.py"), stats, "--layers", str(L),
                            "--experts", str(E)], check=True)
        compare(a.old, a.new, work, f"synthetic E={E} L={L}", stats, None, "4x8", methods)


if __name__ == "__main__":
    main()
