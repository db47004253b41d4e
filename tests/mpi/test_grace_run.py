#!/usr/bin/python3
"""`grace run` under mpiexec, checked against NumPy.

- 2x2, every scheme, primary routing: --verify passes and the reported copies per link class equal a NumPy count
  of spec §6 (with primary routing the destination of expert e is primary_gpu[e], so no router is needed here);
- tar routing and bf16 weights: --verify passes;
- weights from a safetensors checkpoint written here (OLMoE tensor names): outputs equal a NumPy SwiGLU reference
  (through --verify, and the report's bytes), a missing expert is a clear error naming the tensor;
- faults: GRACE_FAIL_RANK=1 ends the job within seconds naming rank 1; different plans on different ranks are
  detected; the wrong process count is an error.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

GRACE = os.environ["GRACE_BIN"]
MPIEXEC = os.environ.get("GRACE_MPIEXEC", "mpiexec")
MPI = [MPIEXEC, "--oversubscribe", "--allow-run-as-root"]
E, K, L, T = 8, 2, 2, 50
FAILED = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILED.append(what)


def write_case(d, nodes, m, name="plan.json", shift=0):
    g = nodes * m
    rng = np.random.default_rng(5)
    ids = np.zeros((T, L, K), dtype=np.int32)
    for t in range(T):
        for l in range(L):
            ids[t, l] = rng.choice(E, size=K, replace=False)
    np.save(os.path.join(d, "trace.npy"), ids)
    with open(os.path.join(d, "trace.json"), "w") as f:
        json.dump({"format": "grace.trace/v1", "num_experts": E, "top_k": K, "num_layers": L}, f)
    layers = []
    for l in range(L):
        primary = [((e + l + shift) * g) // E % g for e in range(E)]
        gpu_experts = [[] for _ in range(g)]
        for e in range(E):
            gpu_experts[primary[e]].append(e)
            if e % 3 == 0 and g > 1:  # one replica on another GPU (another node when there is one)
                gpu_experts[(primary[e] + m) % g if nodes > 1 else (primary[e] + 1) % g].append(e)
        layers.append({"layer": l, "gpu_experts": [sorted(x) for x in gpu_experts], "primary_gpu": primary,
                       "routing": {"policy": "tar"}})
    plan = {"format": "grace.plan/v1", "num_experts": E, "num_layers": L, "top_k": K,
            "topology": {"nodes": nodes, "gpus_per_node": m, "slots_per_gpu": None}, "method": "test",
            "layers": layers}
    with open(os.path.join(d, name), "w") as f:
        json.dump(plan, f)
    return ids, plan


def predicted_copies(ids, plan, scheme):
    """Spec §6 copies per [intra, cross] with primary routing, over all layers run."""
    nodes, m = plan["topology"]["nodes"], plan["topology"]["gpus_per_node"]
    g = nodes * m
    out = np.zeros(2, dtype=np.int64)
    for l in range(L):
        primary = plan["layers"][l]["primary_gpu"]
        for t in range(T):
            h = (t * g) // T
            dests = [primary[e] for e in ids[t, l]]
            if scheme == "flat":
                for d in dests:
                    if d != h:
                        out[0 if d // m == h // m else 1] += 1
            elif scheme == "flat-dedup":
                for d in set(dests):
                    if d != h:
                        out[0 if d // m == h // m else 1] += 1
            else:
                gpus = set(dests)
                for b in {d // m for d in gpus}:
                    if b != h // m:
                        out[1] += 1
                for d in gpus:
                    entry = h if d // m == h // m else (d // m) * m + h % m
                    if d != entry:
                        out[0] += 1
    return out


def run(args, np_=4, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    t0 = time.time()
    p = subprocess.run(MPI + ["-n", str(np_), GRACE, "run"] + args, capture_output=True, text=True, env=full_env,
                       timeout=timeout)
    return p, time.time() - t0


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def main():
    with tempfile.TemporaryDirectory() as d:
        ids, plan = write_case(d, 2, 2)
        common = ["--plan", os.path.join(d, "plan.json"), "--trace", os.path.join(d, "trace.npy"),
                  "--hidden", "16", "--intermediate", "8", "--seed", "3", "--batch-tokens", "5", "--verify"]
        for scheme in ["flat", "flat-dedup", "hsc"]:
            out = os.path.join(d, f"r_{scheme}.json")
            p, _ = run(common + ["--comm", scheme, "--routing", "primary", "-o", out])
            check(p.returncode == 0, f"2x2 {scheme} primary runs ({p.stderr.strip()[-300:]})")
            if p.returncode != 0:
                continue
            r = json.load(open(out))
            check(r["verify"]["passed"] and r["verify"]["max_rel_err"] < 1e-5,
                  f"2x2 {scheme}: outputs equal the dense reference (max rel err {r['verify']['max_rel_err']:.2e})")
            pred = predicted_copies(ids, plan, scheme)
            got = [r["bytes"]["dispatch"]["intra_node"]["copies"], r["bytes"]["dispatch"]["cross_node"]["copies"]]
            check(list(pred) == got, f"2x2 {scheme}: copies {got} equal the NumPy count {list(pred)}")
            check(r["bytes"]["dispatch"]["cross_node"]["payload"] == pred[1] * 16 * 4,
                  f"2x2 {scheme}: cross-node payload bytes = copies x H x 4")
            check(r["bytes"]["combine"]["cross_node"]["payload"] == r["bytes"]["dispatch"]["cross_node"]["payload"],
                  f"2x2 {scheme}: combine returns as many bytes as dispatch sent")
            for phase in ["routing", "layout", "dispatch", "expert", "combine"]:
                check(r["time_s"][phase]["max"] >= 0, f"2x2 {scheme}: phase {phase} timed")

        p, _ = run(common + ["--comm", "hsc", "--routing", "tar", "--dtype", "bf16", "-o", os.path.join(d, "b.json")])
        check(p.returncode == 0 and json.load(open(os.path.join(d, "b.json")))["verify"]["passed"],
              "2x2 hsc tar bf16: --verify passes")

        # A checkpoint with OLMoE names; verify against NumPy for one token by hand as well.
        H, I = 12, 6
        rng = np.random.default_rng(1)
        tensors = {}
        for l in range(L):
            for e in range(E):
                for which, shape in [("gate", (I, H)), ("up", (I, H)), ("down", (H, I))]:
                    tensors[f"model.layers.{l}.mlp.experts.{e}.{which}_proj.weight"] = rng.standard_normal(shape) * 0.3
        ckpt = os.path.join(d, "model.safetensors")
        write_safetensors(ckpt, tensors)
        base = ["--plan", os.path.join(d, "plan.json"), "--trace", os.path.join(d, "trace.npy"), "--comm", "hsc",
                "--verify", "--weights", ckpt]
        p, _ = run(base + ["-o", os.path.join(d, "c.json")])
        check(p.returncode == 0, f"checkpoint run ({p.stderr.strip()[-300:]})")
        if p.returncode == 0:
            r = json.load(open(os.path.join(d, "c.json")))
            check(r["hidden"] == H and r["verify"]["passed"], "checkpoint: H read from the file, --verify passes")
        missing = dict(tensors)
        del missing["model.layers.1.mlp.experts.5.up_proj.weight"]
        write_safetensors(os.path.join(d, "missing.safetensors"), missing)
        p, secs = run(["--plan", os.path.join(d, "plan.json"), "--trace", os.path.join(d, "trace.npy"),
                       "--weights", os.path.join(d, "missing.safetensors"), "-o", os.path.join(d, "m.json")])
        check(p.returncode != 0 and "model.layers.1.mlp.experts.5.up_proj.weight" in p.stderr,
              f"missing expert: error names the tensor ({secs:.1f} s)")

        # Faults.
        p, secs = run(common + ["--comm", "hsc", "-o", os.path.join(d, "f.json")], env={"GRACE_FAIL_RANK": "1"},
                      timeout=60)
        check(p.returncode != 0 and "rank 1" in p.stderr and "injected failure" in p.stderr and secs < 30,
              f"GRACE_FAIL_RANK=1 ends the job in {secs:.1f} s naming rank 1")
        check(not os.path.exists(os.path.join(d, "f.json")), "no report after a failure")
        write_case(d, 2, 2, name="plan_b.json", shift=1)
        other = ["--trace", os.path.join(d, "trace.npy"), "--hidden", "16", "--intermediate", "8",
                 "-o", os.path.join(d, "x.json")]
        t0 = time.time()
        p = subprocess.run(MPI + ["-n", "1", GRACE, "run", "--plan", os.path.join(d, "plan_b.json")] + other +
                           [":", "-n", "3", GRACE, "run", "--plan", os.path.join(d, "plan.json")] + other,
                           capture_output=True, text=True, timeout=60)
        check(p.returncode != 0 and "ranks disagree on --plan: rank 1 has --plan " in p.stderr,
              f"different plans on different ranks are detected ({time.time() - t0:.1f} s)")
        p, _ = run(common + ["-o", os.path.join(d, "w.json")], np_=3, timeout=60)
        check(p.returncode != 0 and "needs 4 processes" in p.stderr, "wrong process count is an error")
        # Without a checkpoint or a shape, the trace's model must name a preset; 'toy' does not.
        i = common.index("--hidden")
        noshape = common[:i] + common[i + 4:]  # drops --hidden 16 --intermediate 8
        assert "--intermediate" not in noshape
        p, _ = run(noshape + ["--model", "toy", "-o", os.path.join(d, "ns.json")], timeout=60)
        check(p.returncode != 0 and "the trace's model 'toy' is no preset" in p.stderr,
              "no checkpoint, no shape and no preset model is a one-line error")

        # End to end: grace gen -> grace plan -> grace run vs grace eval, copies per link class equal.
        tr, pl = os.path.join(d, "g.npy"), os.path.join(d, "g_plan.json")
        p1 = subprocess.run([GRACE, "gen", "--preset", "olmoe", "--tokens", "600", "--layers", "2", "--seed", "2",
                             "--threads", "1", "-o", tr], capture_output=True, text=True)
        p2 = subprocess.run([GRACE, "plan", "--trace", tr, "--topology", "2x2", "--method", "grace", "--threads", "1",
                             "-q", "-o", pl], capture_output=True, text=True)
        check(p1.returncode == 0 and p2.returncode == 0, f"gen + plan ({p1.stderr[-200:]}{p2.stderr[-200:]})")
        for scheme in ["flat", "flat-dedup", "hsc"]:
            rr, ev = os.path.join(d, f"g_run_{scheme}.json"), os.path.join(d, f"g_eval_{scheme}")
            p, _ = run(["--plan", pl, "--trace", tr, "--comm", scheme, "--hidden", "32", "--intermediate", "16",
                        "--batch-tokens", "64", "-o", rr])
            pe = subprocess.run([GRACE, "eval", "--trace", tr, "--plan", pl, "--comm", scheme, "--hidden", "32",
                                 "--intermediate", "16", "-o", ev], capture_output=True, text=True)
            if p.returncode != 0 or pe.returncode != 0:
                check(False, f"gen/plan/run/eval {scheme} ({p.stderr[-200:]}{pe.stderr[-200:]})")
                continue
            got = json.load(open(rr))["bytes"]["dispatch"]
            want = json.load(open(ev + ".json"))["total"]
            check([got["intra_node"]["copies"], got["cross_node"]["copies"]] ==
                  [want["intra_node_copies"], want["cross_node_copies"]],
                  f"grace run {scheme} copies equal grace eval's on a generated trace and a grace plan "
                  f"({got['cross_node']['copies']} cross)")

        # One rank without MPI: the local backend on a 1x1 plan.
        write_case(d, 1, 1, name="plan_1.json")
        p = subprocess.run([GRACE, "run", "--backend", "local", "--plan", os.path.join(d, "plan_1.json"), "--trace",
                            os.path.join(d, "trace.npy"), "--hidden", "8", "--intermediate", "4", "--verify", "-o",
                            os.path.join(d, "l.json")], capture_output=True, text=True, timeout=60)
        check(p.returncode == 0, f"local backend 1x1 ({p.stderr.strip()[-200:]})")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
