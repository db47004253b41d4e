#!/usr/bin/env python3
"""Issue #13 item 1: the default method (`grace` = priced+priced+tar) against every other row of `grace compare`,
and the ablation of the priced objective (docs/planning.md, "Priced objective").

    /usr/bin/python3 bench/priced_targets.py [--grace build/tools/grace/grace] [--work DIR] [--part targets|ablation|all]

Targets: priced end-to-end time (a100-testbed, HSC rows as compare prices them) of the row "GRACE" next to the
fastest other row, on
  - docs/results.md's setting: `grace gen --preset MODEL --dataset wikitext --tokens 49152 --seed 0`, olmoe and
    qwen3-30b-a3b, topologies 2x2 and 2x4, no slot count;
  - the real GPT-OSS-20B traces (../shared/data/real/gpt-oss-20b-routing): planned on mmlu_test and evaluated on
    mmlu_pro_test, and in-domain on mmlu_test, 2x2, 2x4, 4x4, 4x8;
  - the slot-exact cells of bench/engine_targets.sh (16384 tokens, seed 7; GPT-OSS cross-domain; 2x4 and 4x8,
    S = ceil(E/G) + 1), where `--engine sglang` adds EPLB's and GRACE's SGLang deployments as rows.
Ablation: `grace profile` + `grace plan --method M` + `grace eval --comm hsc` of the paper's method, each priced
choice alone, and both, on the same traces without a slot count.
Prints markdown tables; every number comes from the commands above.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(ROOT), "shared", "data", "real", "gpt-oss-20b-routing")
ABLATION = [("paper (grace-paper)", "hierarchical+dynamic+tar"),
            ("DR rounds priced", "hierarchical+priced+tar"),
            ("split / level-2 priced", "priced+dynamic+tar"),
            ("both (grace, default)", "grace"),
            ("iterated DR, not priced", "hierarchical+dynamic-iter+tar")]


def sh(*args):
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stderr}")
    return r.stdout


def traces(g, work, tokens, seed):
    out = []
    for m in ("olmoe", "qwen3-30b-a3b"):
        t = os.path.join(work, f"{m}-{tokens}-{seed}.npy")
        if not os.path.exists(t):
            sh(g, "gen", "--preset", m, "--dataset", "wikitext", "--tokens", tokens, "--seed", seed, "-o", t)
        out.append((m, t, None))
    return out


def gpt_oss():
    test, pro = (os.path.join(REAL, f"{d}.npy") for d in ("mmlu_test", "mmlu_pro_test"))
    return [("gpt-oss mmlu_test -> mmlu_pro_test", pro, test), ("gpt-oss mmlu_test (in-domain)", test, None)]


def compare(g, work, name, trace, profile, topos, extra=()):
    out = os.path.join(work, "cmp-" + "".join(c if c.isalnum() else "_" for c in name + "-" + "_".join(topos)
                                              + "".join(map(str, extra))))
    args = [g, "compare", "--trace", trace, "--topology", ",".join(topos), "--hardware", "a100-testbed", "-o", out]
    if profile:
        args += ["--profile-trace", profile]
    sh(*args, *extra)
    with open(os.path.join(out, "compare.json")) as f:
        return json.load(f)["entries"]


def target_rows(name, entries):
    by_topo = {}
    for e in entries:
        by_topo.setdefault(e["topology"], {})[e["name"]] = e["total"]["end_to_end_s"] * 1e3
    for topo, rows in by_topo.items():
        mine = rows["GRACE"]
        # "GRACE native" (with --engine) is the same plan as "GRACE".
        other, best = min(((k, v) for k, v in rows.items() if k not in ("GRACE", "GRACE native")),
                          key=lambda kv: (kv[1], kv[0]))
        print(f"| {name} | {topo} | {mine:.1f} | {other} | {best:.1f} | "
              f"{100 * (mine - best) / best:+.2f}% | {rows['+DR+TAR']:.1f} |")


def targets(g, work):
    print("| trace | topology | GRACE (default) ms | fastest other row | its ms | GRACE vs it | +DR+TAR (paper) ms |")
    print("|---|---|---|---|---|---|---|")
    for name, trace, profile in traces(g, work, 49152, 0):
        target_rows(name, compare(g, work, name, trace, profile, ["2x2", "2x4"]))
    for name, trace, profile in gpt_oss():
        target_rows(name, compare(g, work, name, trace, profile, ["2x2", "2x4", "4x4", "4x8"]))
    experts = {"olmoe": 64, "qwen3-30b-a3b": 128}
    for name, trace, profile in traces(g, work, 16384, 7) + gpt_oss()[:1]:
        E = experts.get(name, 32)
        for topo in ("2x4", "4x8"):
            n = int(topo.split("x")[0]) * int(topo.split("x")[1])
            S = (E + n - 1) // n + 1
            entries = compare(g, work, name + "-engine", trace, profile, [topo],
                              ("--engine", "sglang", "--slots-per-gpu", S))
            target_rows(name + (" (16384 tok, seed 7)" if profile is None else ""), entries)


def ablation(g, work):
    cols = [c for c, _ in ABLATION]
    print("| trace | topology | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, trace, profile in traces(g, work, 49152, 0) + gpt_oss()[:1]:
        for topo in ("2x2", "2x4"):
            stats = os.path.join(work, "st-" + "".join(c if c.isalnum() else "_" for c in name) + topo)
            if not os.path.exists(stats):
                sh(g, "profile", profile or trace, "-q", "-o", stats)
            cells = []
            for label, method in ABLATION:
                plan = os.path.join(work, "plan.json")
                sh(g, "plan", "--stats", stats, "--topology", topo, "--method", method, "--hardware", "a100-testbed",
                   "-q", "-o", plan)
                ev = os.path.join(work, "eval")
                sh(g, "eval", "--trace", trace, "--plan", plan, "--comm", "hsc", "--hardware", "a100-testbed", "-o", ev)
                with open(ev + ".json") as f:
                    cells.append(json.load(f)["total"]["end_to_end_s"] * 1e3)
            ref = cells[0]
            print(f"| {name} | {topo} | " + " | ".join(
                f"{v:.1f}" + ("" if i == 0 else f" ({100 * (v - ref) / ref:+.1f}%)") for i, v in enumerate(cells)) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace", default=os.path.join(ROOT, "build/tools/grace/grace"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--part", choices=("targets", "ablation", "all"), default="all")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="grace_priced_")
    os.makedirs(work, exist_ok=True)
    if a.part in ("targets", "all"):
        targets(a.grace, work)
        print()
    if a.part in ("ablation", "all"):
        ablation(a.grace, work)


if __name__ == "__main__":
    main()
