#!/usr/bin/python3
"""Planning quality of every grouping method (docs/planning.md): prints Markdown tables.

For each source (generator presets olmoe and qwen3-30b-a3b; the real C2R LLaMA-MoE co-activation matrices) it
profiles a training trace into statistics, plans every grouping with `grace plan`, and measures on a held-out
test trace (a different seed; for C2R, top-2 sets sampled from the real co-activation counts):
  U gpu / U node   Equation 1 over GPU groups / node groups of the primaries, on the profiled affinity
  sel-x            fraction of token-expert selections whose primary GPU is on another node than the token's
                   home GPU floor(t*G/T) (numpy, primary routing)
  x-ratio dedup    cross-node copies / all copies under flat-dedup, primary routing (`grace eval`)
  x/tok dedup      cross-node copies per token and layer under flat-dedup (one copy per destination GPU)
  x/tok hsc        cross-node copies per token and layer under HSC (one copy per destination node)
  bal before       mean/max GPU load of the primaries on the profiled loads (plan's gpu_load_before)
  bal pred         the same after replication, Equation 4 prediction (plan's predicted_gpu_load)
  bal TAR          measured balancedness on the test trace after replication with TAR routing (`grace eval`)
Replication for the "after" columns: dynamic (DR) for every grouping, EPLB's own for the eplb-* groupings.
Balancedness is the mean over layers of mean_g(load) / max_g(load).

Usage: /usr/bin/python3 scripts/plan_quality.py [--grace build/tools/grace/grace] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

GROUPINGS = ["vanilla", "occult", "c2r", "metis", "spectral-full", "spectral-controlled", "hierarchical",
             "eplb-hierarchical", "eplb-global"]
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared data folder beside the checkout, else the copy the tests carry.
C2R_DIR_CANDIDATES = [os.path.join(_ROOT, "..", "shared", "data", "real", "c2r-coactivation"),
                      os.path.join(_ROOT, "tests", "data", "real", "c2r-coactivation")]


def run(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit("command failed: " + " ".join(cmd) + "\n" + r.stderr)
    return r.stdout


def load_trace(path):
    ids = np.load(path)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    return ids


def write_trace(path, ids, num_experts, model, dataset):
    np.save(path, ids.astype(np.int32))
    meta = {"format": "grace.trace/v1", "num_experts": int(num_experts), "num_layers": int(ids.shape[1]),
            "top_k": int(ids.shape[2]), "num_tokens": int(ids.shape[0]), "model": model, "dataset": dataset,
            "weights": None}
    with open(path[:-4] + ".json", "w") as f:
        json.dump(meta, f)


def utilization(aff, primary, nodes_of_gpu):
    """Mean over layers of U (Equation 1) for GPU groups and node groups."""
    ug, un = [], []
    for l in range(aff.shape[0]):
        a = aff[l].astype(np.float64)
        p = np.asarray(primary[l])
        total = np.triu(a, 1).sum()
        same_gpu = p[:, None] == p[None, :]
        n = nodes_of_gpu[p]
        same_node = n[:, None] == n[None, :]
        ug.append(np.triu(a * same_gpu, 1).sum() / total if total > 0 else 1.0)
        un.append(np.triu(a * same_node, 1).sum() / total if total > 0 else 1.0)
    return float(np.mean(ug)), float(np.mean(un))


def selection_cross(ids, primary, G, M):
    T = ids.shape[0]
    home = (np.arange(T, dtype=np.int64) * G) // T
    cross = 0
    for l in range(ids.shape[1]):
        p = np.asarray(primary[l])[ids[:, l, :]]
        cross += np.count_nonzero(p // M != (home // M)[:, None])
    return cross / ids.size


def balancedness(rows):
    out = []
    for v in rows:
        v = np.asarray(v, dtype=np.float64)
        out.append(v.mean() / v.max() if v.max() > 0 else 1.0)
    return float(np.mean(out))


def evaluate(grace, trace, plan, comm, routing, out):
    # --hidden/--intermediate only price time (not reported here); LLaMA-MoE-v1-3.5B has no preset.
    run([grace, "eval", "--trace", trace, "--plan", plan, "--comm", comm, "--routing", routing, "--hidden", "4096",
         "--intermediate", "1376", "-o", out])
    with open(out + ".json") as f:
        return json.load(f)["total"]


def quality_table(grace, work, title, stats, test_trace, topo):
    name = title.replace(" ", "_")
    N, M = (int(x) for x in topo.split("x"))
    G = N * M
    aff = np.load(os.path.join(stats, "affinity.npy"))
    ids = load_trace(test_trace)
    T = ids.shape[0]
    nodes_of_gpu = np.arange(G) // M
    rows = []
    for g in GROUPINGS:
        base = os.path.join(work, f"{name}_{g}_none.json")
        run([grace, "plan", "--stats", stats, "--topology", topo, "--method", g + "+none+primary", "-q", "-o", base])
        with open(base) as f:
            p0 = json.load(f)
        primary = [lay["primary_gpu"] for lay in p0["layers"]]
        ug, un = utilization(aff, primary, nodes_of_gpu)
        sel = selection_cross(ids, primary, G, M)
        hsc = evaluate(grace, test_trace, base, "hsc", "primary", os.path.join(work, "ev_hsc"))
        dedup = evaluate(grace, test_trace, base, "flat-dedup", "primary", os.path.join(work, "ev_dd"))
        bal0 = balancedness([lay["gpu_load_before"] for lay in p0["layers"]])
        rep = "eplb" if g.startswith("eplb") else "dynamic"
        after = os.path.join(work, f"{name}_{g}_{rep}.json")
        run([grace, "plan", "--stats", stats, "--topology", topo, "--method", f"{g}+{rep}+tar", "-q", "-o", after])
        with open(after) as f:
            p1 = json.load(f)
        bal1 = balancedness([lay["predicted_gpu_load"] for lay in p1["layers"]])
        inst = np.mean([sum(len(x) for x in lay["gpu_experts"]) for lay in p1["layers"]])
        tar = evaluate(grace, test_trace, after, "hsc", "tar", os.path.join(work, "ev_tar"))
        per_tok = T * ids.shape[1]
        rows.append((g, ug, un, sel, dedup["cross_node_ratio"], dedup["cross_node_copies"] / per_tok,
                     hsc["cross_node_copies"] / per_tok, bal0, bal1, tar["balancedness"], f"{rep} ({inst:.1f})"))
    E = aff.shape[1]
    print(f"\n### {title}: E={E}, L={aff.shape[0]}, k={ids.shape[2]}, topology {topo}, test tokens T={T}\n")
    print("| grouping | U gpu | U node | sel-x | x-ratio dedup | x/tok dedup | x/tok hsc | bal before | bal pred | "
          "bal TAR | replication (instances/layer) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | "
              f"{r[7]:.3f} | {r[8]:.3f} | {r[9]:.3f} | {r[10]} |")
    sys.stdout.flush()


def c2r_source(grace, work, tokens, variant):
    src = next((d for d in C2R_DIR_CANDIDATES if os.path.isdir(d)), None)
    if src is None:
        return None
    co = os.path.join(src, f"llama_moe_coactivation_{variant}.npy")
    load = os.path.join(src, f"llama_moe_expert_load_{variant}.npy")
    stats = os.path.join(work, f"c2r_{variant}_stats")
    # Upstream adds 1 to (a, b) and to (b, a) per token: each entry already counts tokens (A, not 2A).
    run([grace, "import-stats", "--coactivation", co, "--load", load, "--top-k", "2",
         "--model", "llama-moe-v1-3.5b", "--dataset", f"longbench-{variant}", "-o", stats])
    # Top-2 routing: each token's expert set is one unordered pair, so sampling pairs in proportion to their
    # co-activation count reproduces the real distribution of expert sets (only token order is lost).
    a = np.load(co).astype(np.float64)
    L, E, _ = a.shape
    iu = np.triu_indices(E, 1)
    rng = np.random.default_rng(1)
    ids = np.zeros((tokens, L, 2), dtype=np.int32)
    for l in range(L):
        w = np.clip(a[l][iu], 0, None)
        pick = rng.choice(len(w), size=tokens, p=w / w.sum())
        swap = rng.random(tokens) < 0.5
        i, j = iu[0][pick], iu[1][pick]
        ids[:, l, 0] = np.where(swap, j, i)
        ids[:, l, 1] = np.where(swap, i, j)
    trace = os.path.join(work, f"c2r_{variant}_test.npy")
    write_trace(trace, ids, E, "llama-moe-v1-3.5b", f"longbench-{variant}")
    return stats, trace


def preset_source(grace, work, preset, train_tokens, test_tokens):
    train = os.path.join(work, f"{preset}_train.npy")
    test = os.path.join(work, f"{preset}_test.npy")
    run([grace, "gen", "--preset", preset, "--tokens", str(train_tokens), "--seed", "0", "--no-weights", "-o", train])
    run([grace, "gen", "--preset", preset, "--tokens", str(test_tokens), "--seed", "1", "--no-weights", "-o", test])
    stats = os.path.join(work, f"{preset}_stats")
    run([grace, "profile", train, "-q", "-o", stats])
    return stats, test


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace", default=os.environ.get("GRACE_BIN", "build/tools/grace/grace"))
    ap.add_argument("--quick", action="store_true", help="fewer tokens")
    args = ap.parse_args()
    scale = 4 if args.quick else 1
    with tempfile.TemporaryDirectory(prefix="grace_quality_") as work:
        print("Generated traces: training seed 0 (profiled into the statistics the planner uses), "
              "test seed 1 (measured); dataset wikitext.")
        s, t = preset_source(args.grace, work, "olmoe", 32768 // scale, 16384 // scale)
        quality_table(args.grace, work, "olmoe", s, t, "2x4")
        s, t = preset_source(args.grace, work, "qwen3-30b-a3b", 16384 // scale, 8192 // scale)
        quality_table(args.grace, work, "qwen3-30b-a3b", s, t, "2x4")
        for variant in ["base", "topt_3"]:
            c = c2r_source(args.grace, work, 65536 // scale, variant)
            if c is None:
                print("\n(C2R co-activation data not found; skipped)")
                break
            quality_table(args.grace, work, f"c2r llama-moe {variant}", c[0], c[1], "2x2")


if __name__ == "__main__":
    main()
