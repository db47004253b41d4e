#!/usr/bin/env python3
"""`grace eval` against an independent NumPy computation (spec §6, §7), plus its bad-input errors.

Primary routing under all four communication schemes on a generated trace and random plans (2x2 and 2x4):
every layer's copy matrix, cross/intra-node copies and bytes, GPU loads, load std, balancedness and imbalance
must equal what NumPy computes from the spec's table.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
H, ELEM = 2048, 2  # olmoe hidden size, bf16


def run(*args):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)


def make_trace(folder, T=3000, L=3, k=4, E=16, seed=1):
    rng = np.random.default_rng(seed)
    pop = rng.zipf(1.6, size=(L, E)).astype(float)
    ids = np.empty((T, L, k), dtype=np.int32)
    for l in range(L):
        p = pop[l] / pop[l].sum()
        # Gumbel top-k: k distinct experts per token, popularity-weighted.
        g = np.log(p)[None, :] - np.log(-np.log(rng.random((T, E))))
        ids[:, l, :] = np.argsort(-g, axis=1)[:, :k]
    path = os.path.join(folder, "trace.npy")
    np.save(path, ids)
    with open(os.path.join(folder, "trace.json"), "w") as f:
        json.dump({"format": "grace.trace/v1", "num_experts": E, "model": "olmoe", "dataset": "numpy-test",
                   "top_k": k, "num_layers": L}, f)
    return path, ids


def make_plan(folder, name, E, L, k, N, M, seed, drop_expert=None, policy="primary"):
    rng = np.random.default_rng(seed)
    G = N * M
    layers = []
    primaries = []
    for l in range(L):
        prim = rng.integers(0, G, size=E)
        gpu_experts = [[] for _ in range(G)]
        for e in range(E):
            if e == drop_expert:
                continue
            gpu_experts[prim[e]].append(e)
            for g in range(G):  # some replicas, which primary routing must ignore
                if g != prim[e] and rng.random() < 0.2:
                    gpu_experts[g].append(e)
        layers.append({"layer": l, "gpu_experts": [sorted(x) for x in gpu_experts],
                       "primary_gpu": [int(x) for x in prim], "routing": {"policy": policy}})
        primaries.append(prim)
    plan = {"format": "grace.plan/v1", "num_experts": E, "num_layers": L, "top_k": k,
            "topology": {"nodes": N, "gpus_per_node": M, "slots_per_gpu": None}, "method": "random", "layers": layers}
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(plan, f)
    return path, primaries


def numpy_counts(ids_l, prim, N, M):
    """Copy matrices [G, G] per scheme for one layer under primary routing, straight from spec §6's table."""
    T, k = ids_l.shape
    G = N * M
    home = (np.arange(T) * G) // T
    dst = prim[ids_l]  # [T, k]
    flat = np.zeros((G, G), dtype=np.int64)
    np.add.at(flat, (np.repeat(home, k), dst.ravel()), 1)
    hit = np.zeros((T, G), dtype=bool)
    hit[np.repeat(np.arange(T), k), dst.ravel()] = True
    dedup = np.zeros((G, G), dtype=np.int64)
    for d in range(G):
        np.add.at(dedup[:, d], home[hit[:, d]], 1)
    hsc = np.zeros((G, G), dtype=np.int64)
    node_hit = hit.reshape(T, N, M).any(axis=2)
    hn, hl = home // M, home % M
    for b in range(N):
        remote = (hn != b) & node_hit[:, b]
        peer = b * M + hl
        np.add.at(hsc, (home[remote], peer[remote]), 1)  # stage 1: one copy per remote node
        for loc in range(M):
            d = b * M + loc
            home_node = (hn == b) & hit[:, d] & (home != d)
            np.add.at(hsc, (home[home_node], np.full(home_node.sum(), d)), 1)
            fwd = remote & hit[:, d] & (peer != d)  # stage 2 inside node b, from the peer
            np.add.at(hsc, (peer[fwd], np.full(fwd.sum(), d)), 1)
    for m in (flat, dedup, hsc):
        np.fill_diagonal(m, 0)
    gpu_load = np.bincount(dst.ravel(), minlength=G)
    return {"flat": flat, "2dh": flat, "flat-dedup": dedup, "hsc": hsc}, gpu_load


def load_json(path):
    with open(path) as f:
        return json.load(f)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)


def split(m, N, M):
    node = np.arange(N * M) // M
    cross = node[:, None] != node[None, :]
    return int(m[cross].sum()), int(m[~cross].sum())


class EvalMatchesNumpy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.trace, cls.ids = make_trace(cls.dir)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_primary_routing_all_schemes(self):
        T, L, k = self.ids.shape
        for (N, M) in [(2, 2), (2, 4)]:
            plan, prims = make_plan(self.dir, f"plan{N}x{M}.json", 16, L, k, N, M, seed=N * 10 + M)
            for scheme in ["flat", "flat-dedup", "2dh", "hsc"]:
                with self.subTest(topology=f"{N}x{M}", scheme=scheme):
                    out = os.path.join(self.dir, f"r_{N}x{M}_{scheme}")
                    r = run("eval", "--trace", self.trace, "--plan", plan, "--comm", scheme, "--routing", "primary",
                            "--hardware", "a100-testbed", "-o", out)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    rep = load_json(out + ".json")
                    self.assertTrue(os.path.exists(out + ".csv"))
                    tot_cross = tot_intra = 0
                    for l in range(L):
                        mats, load = numpy_counts(self.ids[:, l, :], prims[l], N, M)
                        want = mats[scheme]
                        got = rep["layers"][l]
                        np.testing.assert_array_equal(np.array(got["copies"]), want)
                        cross, intra = split(want, N, M)
                        self.assertEqual(got["cross_node_copies"], cross)
                        self.assertEqual(got["intra_node_copies"], intra)
                        self.assertEqual(got["cross_node_bytes"], cross * H * ELEM)
                        self.assertEqual(got["intra_node_bytes"], intra * H * ELEM)
                        np.testing.assert_array_equal(got["gpu_load"], load)
                        self.assertAlmostEqual(got["load_std"], float(load.std()), places=6)
                        self.assertAlmostEqual(got["balancedness"], load.mean() / load.max(), places=12)
                        self.assertAlmostEqual(got["imbalance_ratio"], (load.max() - load.mean()) / load.mean(), places=12)
                        self.assertAlmostEqual(got["cross_node_ratio"], cross / (cross + intra), places=12)
                        tot_cross += cross
                        tot_intra += intra
                        # MoE layer time = dispatch + max compute + combine; idle = max - mean compute.
                        comp = np.array(got["gpu_compute_time_s"])
                        self.assertAlmostEqual(got["gpu_idle_time_s"], comp.max() - comp.mean(), places=12)
                        self.assertAlmostEqual(got["moe_layer_time_s"],
                                               got["dispatch_time_s"] + comp.max() + got["combine_time_s"], places=12)
                    self.assertEqual(rep["total"]["cross_node_copies"], tot_cross)
                    self.assertEqual(rep["total"]["intra_node_copies"], tot_intra)

    def test_cross_node_invariant_between_schemes(self):
        T, L, k = self.ids.shape
        for seed in range(5):
            N, M = (2, 2) if seed % 2 else (4, 2)
            plan, _ = make_plan(self.dir, f"inv{seed}.json", 16, L, k, N, M, seed=100 + seed, policy="tar")
            cross = {}
            for scheme in ["flat", "flat-dedup", "hsc"]:
                out = os.path.join(self.dir, f"inv{seed}_{scheme}")
                r = run("eval", "--trace", self.trace, "--plan", plan, "--comm", scheme, "-o", out)
                self.assertEqual(r.returncode, 0, r.stderr)
                cross[scheme] = load_json(out + ".json")["total"]["cross_node_copies"]
            self.assertLessEqual(cross["hsc"], cross["flat-dedup"])
            self.assertLessEqual(cross["flat-dedup"], cross["flat"])

    def assert_one_line_error(self, r, needle):
        self.assertNotEqual(r.returncode, 0)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("grace: error:"), r.stderr)
        self.assertIn(needle, lines[0])

    def test_bad_input(self):
        T, L, k = self.ids.shape
        good, _ = make_plan(self.dir, "good.json", 16, L, k, 2, 2, seed=3)
        out = os.path.join(self.dir, "bad")
        # E mismatch between plan and trace.
        wrong_e, _ = make_plan(self.dir, "wrong_e.json", 20, L, k, 2, 2, seed=3)
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", wrong_e, "--comm", "hsc", "-o", out),
                                   "experts")
        # Layer mismatch.
        wrong_l, _ = make_plan(self.dir, "wrong_l.json", 16, L + 1, k, 2, 2, seed=3)
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", wrong_l, "--comm", "hsc", "-o", out),
                                   "layers")
        # Topology mismatch with --topology.
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "hsc", "--topology",
                                       "2x4", "-o", out), "topology")
        # An expert without an instance.
        holey, _ = make_plan(self.dir, "holey.json", 16, L, k, 2, 2, seed=3, drop_expert=5)
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", holey, "--comm", "hsc", "-o", out),
                                   "expert 5")
        # Hardware with a non-positive bandwidth, and one with a missing field.
        hw = {"format": "grace.hardware/v1", "element_size": 2, "intra_node": {"bandwidth_GBps": 0, "latency_us": 5},
              "cross_node": {"bandwidth_Gbps": 25, "latency_us": 30}, "compute": {"peak_tflops": 100, "n_half": 10}}
        hw_path = os.path.join(self.dir, "hw.json")
        dump_json(hw, hw_path)
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "hsc", "--hardware",
                                       hw_path, "-o", out), "bandwidth must be positive")
        del hw["compute"]
        hw["intra_node"]["bandwidth_GBps"] = 600
        dump_json(hw, hw_path)
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "hsc", "--hardware",
                                       hw_path, "-o", out), "compute")
        # Unknown scheme / policy / hardware preset.
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "mesh", "-o", out),
                                   "mesh")
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "hsc", "--routing",
                                       "random", "-o", out), "random")
        self.assert_one_line_error(run("eval", "--trace", self.trace, "--plan", good, "--comm", "hsc", "--hardware",
                                       "tpu-pod", "-o", out), "tpu-pod")
        # No partial output was left behind by any failure.
        self.assertFalse(os.path.exists(out + ".json"))

    def test_bad_ids_in_the_trace(self):
        # grace eval checks ids while replaying them (no separate pass): the error names the first bad token in
        # trace order, for any thread count and chunk size, and no report is written.
        T, L, k = self.ids.shape
        good, _ = make_plan(self.dir, "good_ids.json", 16, L, k, 2, 2, seed=3)
        for name, token, layer, value, message in [
                ("range", 2100, 2, 16, "expert id 16 at token 2100, layer 2 is out of range [0, 16)"),
                ("negative", 777, 1, -3, "expert id -3 at token 777, layer 1 is out of range [0, 16)")]:
            folder = os.path.join(self.dir, name)
            os.makedirs(folder)
            trace, ids = make_trace(folder)
            ids[token, layer, 1] = value
            ids[token + 3, 0, 0] = 99  # later in the trace: not the one reported
            np.save(trace, ids)
            out = os.path.join(folder, "rep")
            for threads, chunk in ((1, 500), (2, 64), (2, 4096)):
                r = run("eval", "--trace", trace, "--plan", good, "--comm", "hsc", "--threads", threads, "--chunk",
                        chunk, "-o", out)
                self.assert_one_line_error(r, message)
            self.assertFalse(os.path.exists(out + ".json"))
        folder = os.path.join(self.dir, "repeated")
        os.makedirs(folder)
        trace, ids = make_trace(folder)
        ids[1500, 0, 3] = ids[1500, 0, 0]
        np.save(trace, ids)
        r = run("eval", "--trace", trace, "--plan", good, "--comm", "flat", "--threads", 2, "-o",
                os.path.join(folder, "rep"))
        self.assert_one_line_error(r, f"expert id {ids[1500, 0, 0]} is repeated in the top-k of token 1500, layer 0")


class EvalBatches(unittest.TestCase):
    """`grace eval --batch-tokens B` and `--workload SxP+D`: each batch priced on its own (docs/eval.md)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.trace, cls.ids = make_trace(cls.dir)  # T = 3000, L = 3, k = 4, E = 16
        cls.plan, cls.prims = make_plan(cls.dir, "plan.json", 16, 3, 4, 2, 2, seed=22)
        cls.tar_plan, _ = make_plan(cls.dir, "tar.json", 16, 3, 4, 2, 2, seed=23, policy="tar")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def eval(self, name, *extra, plan=None, trace=None):
        out = os.path.join(self.dir, name)
        r = run("eval", "--trace", trace or self.trace, "--plan", plan or self.plan, "--comm", "hsc", "-o", out,
                *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        return load_json(out + ".json"), out

    def test_batches_equal_separate_traces(self):
        # Primary routing keeps no state, so batch b of --batch-tokens 1100 must price exactly like a trace made of
        # that batch's tokens alone: copies, loads and times per layer add up over the three batches.
        rep, out = self.eval("b1100", "--batch-tokens", 1100)
        bounds = [(0, 1100), (1100, 2200), (2200, 3000)]
        parts = []
        for i, (a, b) in enumerate(bounds):
            folder = os.path.join(self.dir, f"slice{i}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "trace.npy")
            np.save(path, self.ids[a:b])
            with open(os.path.join(self.dir, "trace.json")) as f:
                meta = json.load(f)
            dump_json(meta, os.path.join(folder, "trace.json"))
            parts.append(self.eval(f"slice{i}", trace=path)[0])
        self.assertEqual(rep["batching"]["num_batches"], 3)
        self.assertEqual(rep["batching"]["batch_tokens"], 1100)
        self.assertEqual(rep["num_tokens"], 3000)
        [pre] = rep["phases"]
        self.assertEqual((pre["phase"], pre["num_batches"], pre["min_batch_tokens"], pre["max_batch_tokens"]),
                         ("prefill", 3, 800, 1100))
        for l in range(3):
            got = rep["layers"][l]
            for key in ["cross_node_copies", "intra_node_copies", "local_selections"]:
                self.assertEqual(got[key], sum(p["layers"][l][key] for p in parts), key)
            np.testing.assert_array_equal(got["copies"], sum(np.array(p["layers"][l]["copies"]) for p in parts))
            for key in ["dispatch_time_s", "compute_time_s", "gpu_idle_time_s", "non_moe_time_s", "end_to_end_s"]:
                self.assertAlmostEqual(got[key], sum(p["layers"][l][key] for p in parts), places=12, msg=key)
            # Token-weighted over the batches.
            want = sum(p["layers"][l]["imbalance_ratio"] * p["num_tokens"] for p in parts) / 3000
            self.assertAlmostEqual(got["imbalance_ratio"], want, places=12)
            # The numpy counts of each batch, homes spread over the batch.
            want_hsc = sum(numpy_counts(self.ids[a:b, l, :], self.prims[l], 2, 2)[0]["hsc"] for a, b in bounds)
            np.testing.assert_array_equal(got["copies"], want_hsc)
        ends = [p["total"]["end_to_end_s"] for p in parts]
        self.assertAlmostEqual(pre["batch_end_to_end_s"]["min"], min(ends), places=12)
        self.assertAlmostEqual(pre["batch_end_to_end_s"]["max"], max(ends), places=12)
        self.assertAlmostEqual(rep["total"]["end_to_end_s"], sum(ends), places=12)
        with open(out + ".csv") as f:
            header = f.readline().strip().split(",")
        self.assertEqual(header[-8:], [f"{p}_{c}" for p in ("prefill", "decode") for c in
                                       ("all_to_all_time_s", "compute_time_s", "end_to_end_s", "imbalance_ratio")])

    def test_workload_phases(self):
        # 10x100+20: rounds of 1200 tokens (2 in 3000, 600 left over): a prefill batch of 1000 tokens, then 20
        # decode batches of 10, in trace order.
        rep, out = self.eval("wl", "--workload", "10x100+20")
        self.assertEqual(rep["batching"], {"workload": "10x100+20", "batch_tokens": None, "rounds": 2,
                                           "num_batches": 42, "unused_tokens": 600})
        self.assertEqual(rep["num_tokens"], 2400)
        self.assertEqual(rep["trace_tokens"], 3000)
        pre, dec = rep["phases"]
        self.assertEqual((pre["phase"], pre["num_batches"], pre["num_tokens"]), ("prefill", 2, 2000))
        self.assertEqual((dec["phase"], dec["num_batches"], dec["num_tokens"], dec["max_batch_tokens"]),
                         ("decode", 40, 400, 10))
        for key in ["end_to_end_s", "all_to_all_time_s", "compute_time_s", "non_moe_time_s"]:
            self.assertAlmostEqual(rep["total"][key], pre["total"][key] + dec["total"][key], places=12)
        # Decode batches of 10 tokens on 4 GPUs: a batch's selections, numpy-counted with homes over the batch.
        for l in range(3):
            slices = [(r * 1200, r * 1200 + 1000) for r in range(2)]
            slices += [(r * 1200 + 1000 + 10 * d, r * 1200 + 1010 + 10 * d) for r in range(2) for d in range(20)]
            want = sum(numpy_counts(self.ids[a:b, l, :], self.prims[l], 2, 2)[0]["hsc"] for a, b in slices)
            np.testing.assert_array_equal(rep["layers"][l]["copies"], want)
        # --batch-tokens with a workload cuts the prefill only.
        rep2, _ = self.eval("wl_b", "--workload", "10x100+20", "--batch-tokens", 300)
        self.assertEqual([(p["phase"], p["num_batches"]) for p in rep2["phases"]], [("prefill", 8), ("decode", 40)])

    def test_threads_give_identical_reports(self):
        for extra in (["--workload", "16x50+25"], ["--batch-tokens", 257]):
            outs = []
            for threads, chunk in ((1, 4096), (2, 100)):
                _, out = self.eval(f"thr{threads}", "--threads", threads, "--chunk", chunk, *extra, plan=self.tar_plan)
                files = []
                for ext in (".json", ".csv"):
                    with open(out + ext, "rb") as f:
                        files.append(f.read())
                outs.append(files)
            self.assertEqual(outs[0], outs[1], extra)

    def test_bad_batching_options(self):
        out = os.path.join(self.dir, "bad")
        base = ["eval", "--trace", self.trace, "--plan", self.plan, "--comm", "hsc", "-o", out]
        for extra, needle in [
                (["--batch-tokens", 0], "--batch-tokens"),
                (["--batch-tokens", -5], "--batch-tokens"),
                (["--workload", "256x"], "256x"),
                (["--workload", "0x1+1"], "S (sequences) must be >= 1"),
                (["--workload", "4x0+1"], "P (prefill tokens) must be >= 1"),
                (["--workload", "99999999999x99999999999+1"], "do not fit in 64 bits"),
                (["--workload", "4xa+1"], "not a whole number"),
                (["--workload", "256x128+16"], "needs 36864 tokens but the trace has 3000")]:
            with self.subTest(extra=extra):
                r = run(*base, *extra)
                self.assertNotEqual(r.returncode, 0)
                lines = r.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, r.stderr)
                self.assertTrue(lines[0].startswith("grace: error:"), r.stderr)
                self.assertIn(needle, lines[0])
                self.assertFalse(os.path.exists(out + ".json"))
                self.assertFalse(os.path.exists(out + ".csv"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
