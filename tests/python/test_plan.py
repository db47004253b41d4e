#!/usr/bin/python3
"""`grace plan` / `grace export` from the command line, checked against NumPy.

Statistics are written here with NumPy (independent of the profiler): tokens draw k distinct experts from a
skewed, topic-clustered distribution. Checks, per layer of a `grace` plan: gpu_load_before (sum of primary
loads), gamma, R (Equation 3), the Equation 4 prediction (each instance carries l_e / n_e), WRR weights
proportional to 1 / L'; every export read back describes the plan's placement plus padding; bad input gives a
one-line error and exit status 1.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")


def run(args, ok=True):
    r = subprocess.run([GRACE] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if ok and r.returncode != 0:
        sys.exit(f"FAIL: grace {' '.join(args)}\n{r.stderr}")
    return r


def write_stats(folder, L=3, E=32, k=4, T=1500, seed=3):
    rng = np.random.default_rng(seed)
    aff = np.zeros((L, E, E), dtype=np.int64)
    load = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        pop = np.exp(rng.normal(0, 1, E))
        block = rng.permutation(E) * 4 // E
        for _ in range(T):
            w = pop * np.where(block == rng.integers(4), 10.0, 1.0)
            sel = rng.choice(E, size=k, replace=False, p=w / w.sum())
            load[l, sel] += 1
            for a in sel:
                for b in sel:
                    if a != b:
                        aff[l, a, b] += 1
    os.makedirs(folder)
    np.save(os.path.join(folder, "affinity.npy"), aff)
    np.save(os.path.join(folder, "load.npy"), load)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"format": "grace.stats/v1", "num_layers": L, "num_experts": E, "top_k": k, "num_tokens": T,
                   "model": "numpy", "dataset": "random", "num_gpus": 0}, f)
    return load


def check_plan(plan, load, G):
    for lay in plan["layers"]:
        l = lay["layer"]
        ld = load[l].astype(np.float64)
        prim = np.array(lay["primary_gpu"])
        before = np.bincount(prim, weights=ld, minlength=G)
        assert np.allclose(before, lay["gpu_load_before"]), "gpu_load_before"
        gamma = before.max() / before.mean()
        assert abs(gamma - lay["replication"]["gamma"]) < 1e-9, "gamma"
        R = min(G - 1, math.ceil(gamma - 1e-9) - 1)
        assert lay["replication"]["num_replicas"] == R, ("R", R, lay["replication"]["num_replicas"])
        count = np.zeros(len(ld))
        for ex in lay["gpu_experts"]:
            count[ex] += 1
        pred = np.array([sum(ld[e] / count[e] for e in ex) for ex in lay["gpu_experts"]])
        assert np.allclose(pred, lay["predicted_gpu_load"]), "Equation 4"
        # Equation 4 in its own form: L'_h = L_h - dL + dL/(R+1) when every hot expert got R replicas.
        hot = lay["replication"]["hot_experts"]
        h = int(np.argmax(before))
        if hot and all(count[e] == R + 1 for e in hot):
            dL = ld[hot].sum()
            assert abs(pred[h] - (before[h] - dL + dL / (R + 1))) < 1e-6, "Equation 4, heavy GPU"
        Q = lay["routing"]["period"]
        for e, (inst, w) in enumerate(zip(lay["routing"]["instances"], lay["routing"]["weights"])):
            assert inst[0] == prim[e] and sum(w) == Q and min(w) >= 1
            ideal = (1.0 / pred[inst]) / (1.0 / pred[inst]).sum() * Q
            assert np.all(np.abs(np.array(w) - ideal) < 1.0 + 1e-9), ("WRR", w, ideal)


def read_export(path, fmt, G):
    if fmt == "sglang":
        rows = json.load(open(path))["physical_to_logical_map"]
    elif fmt == "eplb":
        rows = json.load(open(path))["phy2log"]
    elif fmt == "trtllm":
        rows = []
        for line in open(path):
            if line.startswith("  "):
                rows.append([int(x) for x in line.split("[")[1].split("]")[0].split(",")])
    else:
        j = json.load(open(path))
        return [[d["device_expert"] for d in lay["device_list"]] for lay in j["layer_list"]]
    out = []
    for r in rows:
        S = len(r) // G
        assert S * G == len(r)
        out.append([r[g * S:(g + 1) * S] for g in range(G)])
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        stats = os.path.join(d, "stats")
        load = write_stats(stats)
        plan = os.path.join(d, "plan.json")
        out = run(["plan", "--stats", stats, "--topology", "2x4", "--method", "grace", "-o", plan]).stdout
        assert "gamma" in out and out.count("\n") >= 5, out
        p = json.load(open(plan))
        assert p["method"] == "priced+priced+tar"
        check_plan(p, load, 8)
        run(["plan", "--stats", stats, "--topology", "2x4", "--method", "grace-paper", "-q", "-o", plan])
        p = json.load(open(plan))
        assert p["method"] == "hierarchical+dynamic+tar"
        check_plan(p, load, 8)
        for method in ["occult+fixed+wrr", "metis+eplb+tar", "spectral-controlled:0.2+dynamic+wrr", "eplb"]:
            run(["plan", "--stats", stats, "--topology", "2x4", "--slots-per-gpu", "6", "--method", method, "-q",
                 "-o", plan])
            p = json.load(open(plan))
            for lay in p["layers"]:  # slot-exact: every GPU holds exactly 6 distinct experts
                assert all(len(ex) == 6 and len(set(ex)) == len(ex) for ex in lay["gpu_experts"]), method
            # An export of a slot-exact plan pads nothing: the engine gets exactly the plan's GPU sets.
            out = run(["export", plan, "--format", "sglang", "-o", os.path.join(d, "exact.json")]).stdout
            assert ", 0 padding replicas" in out and "note:" not in out, out
            for lay, got in zip(p["layers"], read_export(os.path.join(d, "exact.json"), "sglang", 8)):
                assert [sorted(g) for g in got] == lay["gpu_experts"], method
        # --redundant-experts R is the engines' way to say S = (E + R) / G: 32 + 16 over 8 GPUs = 6 slots.
        plan_r = os.path.join(d, "plan_r.json")
        run(["plan", "--stats", stats, "--topology", "2x4", "--redundant-experts", "16", "-q", "-o", plan_r])
        run(["plan", "--stats", stats, "--topology", "2x4", "--slots-per-gpu", "6", "-q", "-o", plan])
        assert json.load(open(plan_r)) == json.load(open(plan))
        # --no-fill-slots: the slot count is an upper bound, and the export says what it padded and why.
        # (the paper's method: the default's priced DR rounds may use every slot by themselves)
        run(["plan", "--stats", stats, "--topology", "2x4", "--slots-per-gpu", "6", "--no-fill-slots", "--method",
             "grace-paper", "-q", "-o", plan])
        p = json.load(open(plan))
        assert any(len(ex) < 6 for lay in p["layers"] for ex in lay["gpu_experts"])
        out = run(["export", plan, "--format", "sglang", "-o", os.path.join(d, "padded.json")]).stdout
        assert "note: the plan holds" in out and "padding replicas that no planning step chose" in out, out
        run(["plan", "--stats", stats, "--topology", "2x4", "--method", "grace", "-q", "-o", plan])
        p = json.load(open(plan))
        for fmt, name in [("sglang", "s.json"), ("vllm-ascend", "v.json"), ("trtllm", "t.yaml"), ("eplb", "e.json")]:
            path = os.path.join(d, name)
            run(["export", plan, "--format", fmt, "--stats", stats, "-o", path])
            back = read_export(path, fmt, 8)
            S = max(len(ex) for lay in p["layers"] for ex in lay["gpu_experts"])
            for lay, got in zip(p["layers"], back):
                for ex, g in zip(lay["gpu_experts"], got):
                    assert len(g) == S and len(set(g)) == S and set(ex) <= set(g), (fmt, ex, g)
        run(["export", plan, "--format", "eplb", "-o", os.path.join(d, "npy")])
        cnt = np.load(os.path.join(d, "npy", "logcnt.npy"))
        assert cnt.shape == (3, 32) and cnt.min() >= 1

        # A trace whose metadata says E = 64 while the statistics have 32.
        trace = os.path.join(d, "t.npy")
        np.save(trace, np.zeros((10, 3, 4), dtype=np.int32) + np.arange(4, dtype=np.int32))
        json.dump({"format": "grace.trace/v1", "num_experts": 64}, open(os.path.join(d, "t.json"), "w"))
        bad = [
            (["--topology", "8x8"], "64 GPUs but the statistics have only 32"),
            (["--topology", "2x4", "--slots-per-gpu", "3"], "too few for the 32 experts"),
            (["--topology", "0x4"], "0x4"),
            (["--topology", "2x4", "--method", "hierarchical+dynamic+fastest"], "unknown routing 'fastest'"),
            (["--topology", "2x4", "--method", "kmeans"], "unknown grouping 'kmeans'"),
            (["--topology", "4x8", "--method", "spectral-controlled"], "single point"),
            (["--topology", "2x4", "--trace", trace], "have E=32 experts but the trace"),
            (["--topology", "2x4", "--experts", "16"], "--experts says 16"),
            (["--topology", "2x4", "--redundant-experts", "3"], "do not split evenly over 8 GPUs"),
            (["--topology", "2x4", "--redundant-experts", "-8"], "--redundant-experts"),
            (["--topology", "2x4", "--redundant-experts", "8", "--slots-per-gpu", "5"], "not both"),
            (["--topology", "2x4", "--no-fill-slots"], "--no-fill-slots needs"),
            (["--topology", "2x4", "--robust", "0.9"], "re-profile with `grace profile ... --window-tokens W`"),
            (["--topology", "2x4", "--robust", "0"], "--robust"),
            (["--topology", "2x4", "--robust", "1.5"], "must be a number in (0, 1]"),
        ]
        for args, needle in bad:
            r = run(["plan", "--stats", stats, "-o", os.path.join(d, "bad.json")] + args, ok=False)
            err = r.stderr.strip()
            assert r.returncode in (1, 2), (args, r.returncode, err)  # 2: an option rejected at parse time
            assert err.startswith("grace: error: ") and "\n" not in err and needle in err, (args, err)
            assert not os.path.exists(os.path.join(d, "bad.json"))
    print("ok")


if __name__ == "__main__":
    main()
