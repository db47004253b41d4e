"""The `grace` Python module: same results as the CLI on the same inputs (profile, plan, eval, export), trace and
plan I/O, the replica router against an independent smooth-WRR implementation, and GraceError (a ValueError)
for arrays of a wrong dtype or shape. Skips cleanly when the module was not built (GRACE_BUILD_PYTHON=OFF)."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
GRACE = os.environ.get("GRACE_BIN", os.path.join(BUILD, "tools", "grace", "grace"))
MODULE_DIR = os.path.join(BUILD, "python")

if not os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    print(f"SKIP: {MODULE_DIR}/grace not built (configure with -DGRACE_BUILD_PYTHON=ON)")
    sys.exit(0)
sys.path.insert(0, MODULE_DIR)
import grace  # noqa: E402

if grace._EXT_ERROR is not None:  # built but not importable: a real failure
    raise SystemExit(f"grace._grace does not import: {grace._EXT_ERROR}")

from grace.tracefile import profile_numpy, read_trace, write_trace  # noqa: E402


def cli(*args):
    r = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {r.stderr}")
    return r


def cli_has(cmd):
    r = subprocess.run([GRACE, "--help"], capture_output=True, text=True)
    return f" {cmd} " in r.stdout or f"\n  {cmd}" in r.stdout


def make_ids(T=1500, L=2, k=2, E=8, seed=1):
    """Popularity-skewed top-k with pair structure (experts 2i and 2i+1 co-activate often)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((T, L, k), np.int32)
    for l in range(L):
        pop = rng.zipf(1.8, size=E).astype(float)
        p = pop / pop.sum()
        g = np.log(p)[None, :] - np.log(-np.log(rng.random((T, E))))
        order = np.argsort(-g, axis=1)
        ids[:, l, :] = order[:, :k]
        pair = rng.random(T) < 0.5  # second choice = partner of the first
        partner = ids[:, l, 0] ^ 1
        ids[pair, l, 1] = partner[pair]
    return ids


def smooth_wrr(weights):
    """nginx smooth weighted round-robin, ties to the lowest index (independent of the C++ one)."""
    cur = [0] * len(weights)
    out = []
    for _ in range(sum(weights)):
        cur = [c + w for c, w in zip(cur, weights)]
        best = max(range(len(weights)), key=lambda i: (cur[i], -i))
        cur[best] -= sum(weights)
        out.append(best)
    return out


def small_plan(policy="wrr"):
    """2 nodes x 1 GPU, E=4; expert 0 replicated on both GPUs with WRR weights 2:1."""
    return {"format": "grace.plan/v1", "num_experts": 4, "num_layers": 1, "top_k": 2,
            "topology": {"nodes": 2, "gpus_per_node": 1, "slots_per_gpu": None}, "method": "hand",
            "layers": [{"layer": 0, "gpu_experts": [[0, 1], [0, 2, 3]], "primary_gpu": [0, 0, 1, 1],
                        "routing": {"policy": policy, "period": 3, "weights": [[2, 1], [3], [3], [3]]}}]}


class Core(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def test_error_type(self):
        self.assertTrue(issubclass(grace.GraceError, ValueError))

    def test_trace_round_trip(self):
        ids = make_ids(T=50, L=3, k=2, E=8)
        w = np.random.default_rng(0).random(ids.shape).astype(np.float32)
        p = os.path.join(self.d, "t.npy")
        grace.save_trace(p, ids.astype(np.int64), 8, weights=w, model="olmoe", dataset="x")
        got, gw, meta = read_trace(p)  # NumPy reader: what the C++ writer wrote
        np.testing.assert_array_equal(got, ids)
        np.testing.assert_allclose(gw, w)
        self.assertEqual((meta["format"], meta["num_experts"], meta["top_k"], meta["num_layers"]),
                         ("grace.trace/v1", 8, 2, 3))
        p2 = os.path.join(self.d, "u.npy")
        write_trace(p2, ids, 8, w, model="m", dataset="d")  # NumPy writer, C++ reader
        t = grace.load_trace(p2)
        np.testing.assert_array_equal(t["ids"], ids)
        np.testing.assert_allclose(t["weights"], w)
        self.assertEqual((t["num_tokens"], t["num_layers"], t["top_k"], t["num_experts"], t["model"]),
                         (50, 3, 2, 8, "m"))
        self.assertEqual(t["ids"].dtype, np.int32)

    def test_bad_arrays(self):
        ids = make_ids(T=20, L=2, k=2, E=8)
        cases = [
            (ids.astype(np.float32), "integer"),
            (ids.astype(bool), "integer"),
            (ids[:, 0, 0], "dimensions"),
            (ids[None], "dimensions"),
            ([[0, 1]], "NumPy array"),
            (np.where(ids == 3, 9, ids), "outside"),
            (np.where(ids == 3, -1, ids), "outside"),
            (np.stack([ids[:, :, 0], ids[:, :, 0]], 2), "repeat"),
        ]
        for bad, needle in cases:
            with self.assertRaises(grace.GraceError) as cm:
                grace.validate_trace(bad, 8)
            self.assertIn(needle, str(cm.exception))
            self.assertNotIn("\n", str(cm.exception))
        with self.assertRaisesRegex(grace.GraceError, "float"):
            grace.validate_trace(ids, 8, weights=np.ones(ids.shape, np.int32))
        with self.assertRaisesRegex(grace.GraceError, "shape"):
            grace.validate_trace(ids, 8, weights=np.ones((20, 2, 3), np.float32))
        with self.assertRaises(ValueError):  # catchable as a plain ValueError
            grace.save_trace(os.path.join(self.d, "x.npy"), ids.astype(np.float64), 8)
        self.assertFalse(os.path.exists(os.path.join(self.d, "x.npy")))
        with self.assertRaisesRegex(grace.GraceError, "topology"):
            grace.Topology.parse("2y3")
        with self.assertRaisesRegex(grace.GraceError, "dict"):
            grace.validate_plan(42)
        bad_plan = small_plan()
        bad_plan["layers"][0]["gpu_experts"] = [[1], [2, 3]]  # expert 0 has no instance
        with self.assertRaises(grace.GraceError):
            grace.validate_plan(bad_plan)

    def test_plan_json_round_trip(self):
        plan = grace.validate_plan(small_plan())
        p = os.path.join(self.d, "p.json")
        grace.save_plan(plan, p)
        self.assertEqual(grace.load_plan(p), plan)
        with open(p) as f:
            self.assertEqual(json.load(f), plan)
        self.assertEqual(grace.plan_hash(plan), grace.plan_hash(json.dumps(plan)))
        self.assertEqual(plan["layers"][0]["routing"]["instances"][0], [0, 1])

    def test_router_wrr_matches_independent_sequence(self):
        self.assertEqual(grace.smooth_wrr_sequence([5, 3, 2]).tolist(), smooth_wrr([5, 3, 2]))
        self.assertEqual(grace.smooth_wrr_sequence([1, 1, 4]).tolist(), smooth_wrr([1, 1, 4]))
        r = grace.ReplicaRouter(small_plan(), 0, policy="wrr")
        self.assertEqual(r.period, 3)
        T = 30
        ids = np.tile(np.array([[0, 1]], np.int32), (T, 1))
        src = np.zeros(T, np.int64)
        got = r.route_tokens(ids, src)
        # expert 0 from GPU 0: instances [GPU 0, GPU 1] picked by the smooth WRR sequence of weights [2, 1]
        seq = smooth_wrr([2, 1])
        want0 = [[0, 1][seq[i % 3]] for i in range(T)]
        self.assertEqual(got[:, 0].tolist(), want0)
        self.assertTrue((got[:, 1] == 0).all())  # expert 1 lives on GPU 0 only
        r2 = grace.ReplicaRouter(small_plan(), 0, policy="primary")
        self.assertTrue((r2.route_tokens(ids, src)[:, 0] == 0).all())
        with self.assertRaisesRegex(grace.GraceError, "source GPU"):
            r.route(5, 0, 0, 0, 2)
        with self.assertRaisesRegex(grace.GraceError, "integer"):
            r.route_tokens(ids.astype(float), src)
        with self.assertRaisesRegex(grace.GraceError, "entries"):
            r.route_tokens(ids, src[:3])
        with self.assertRaisesRegex(grace.GraceError, "unknown routing policy"):
            grace.ReplicaRouter(small_plan(), 0, policy="fastest")


@unittest.skipUnless(os.path.exists(GRACE), "grace CLI not built")
class SameAsCli(unittest.TestCase):
    """Each binding against the CLI command on the same files."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.d = cls.tmp.name
        cls.E, cls.ids = 8, make_ids()
        cls.trace = os.path.join(cls.d, "trace.npy")
        write_trace(cls.trace, cls.ids, cls.E, model="olmoe", dataset="bindings-test")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def stats_path(self):
        out = os.path.join(self.d, "stats")
        if not os.path.exists(out):
            cli("profile", self.trace, "-o", out, "--topology", "2x2", "-q")
        return out

    @unittest.skipUnless(hasattr(grace, "profile") and cli_has("profile"), "profile not built yet")
    def test_profile(self):
        out = self.stats_path()
        st = grace.profile(self.ids, self.E, topology="2x2", model="olmoe", dataset="bindings-test")
        for name in ("load", "affinity", "source_load"):
            np.testing.assert_array_equal(st[name], np.load(os.path.join(out, f"{name}.npy")), err_msg=name)
        load, aff = profile_numpy(self.ids)  # independent NumPy profile
        np.testing.assert_array_equal(st["load"], load)
        np.testing.assert_array_equal(st["affinity"], aff)
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        for key in ("num_layers", "num_experts", "top_k", "num_tokens", "num_gpus", "model", "dataset"):
            self.assertEqual(st[key], meta[key], key)
        c = grace.load_stats(out)
        np.testing.assert_array_equal(c["affinity"], st["affinity"])
        with self.assertRaisesRegex(grace.GraceError, "integer"):
            grace.profile(self.ids.astype(np.float32), self.E)
        with self.assertRaisesRegex(grace.GraceError, "load"):
            grace.plan({"affinity": st["affinity"]}, "2x2")

    @unittest.skipUnless(hasattr(grace, "plan") and cli_has("plan"), "planner not built yet")
    def test_plan_eval_export(self):
        stats_dir = self.stats_path()
        st = grace.load_stats(stats_dir)
        for method in ("grace", "vanilla", "hierarchical+fixed+wrr"):
            out = os.path.join(self.d, f"plan-{method.replace('+', '_')}.json")
            cli("plan", "--stats", stats_dir, "--topology", "2x2", "--method", method, "-o", out, "-q")
            with open(out) as f:
                want = json.load(f)
            got = grace.plan(st, "2x2", method=method, source=stats_dir)
            self.assertEqual(got, want, method)
            self.assertEqual(grace.plan(grace.profile(self.ids, self.E, model="olmoe", dataset="bindings-test",
                                                      topology="2x2"), (2, 2), method=method, source=stats_dir),
                             want)
        plan = want
        if hasattr(grace, "evaluate") and cli_has("eval"):
            for comm in ("hsc", "flat"):
                for routing in (None, "primary"):
                    stem = os.path.join(self.d, f"rep-{comm}-{routing}")
                    args = ["eval", "--trace", self.trace, "--plan", out, "--comm", comm, "-o", stem]
                    if routing:
                        args += ["--routing", routing]
                    cli(*args)
                    with open(stem + ".json") as f:
                        want_rep = json.load(f)
                    got_rep = grace.evaluate(self.ids, plan, comm=comm, routing=routing, model="olmoe",
                                             dataset="bindings-test")
                    self.assertEqual(got_rep, want_rep, (comm, routing))
            # Batches and workloads: the same options as the CLI, the same report (T = 1500).
            for extra, kw in ((["--batch-tokens", "700"], {"batch_tokens": 700}),
                              (["--workload", "8x50+10"], {"workload": "8x50+10"})):
                stem = os.path.join(self.d, "rep-batched")
                cli("eval", "--trace", self.trace, "--plan", out, "--comm", "hsc", "-o", stem, *extra)
                with open(stem + ".json") as f:
                    want_rep = json.load(f)
                got_rep = grace.evaluate(self.ids, plan, model="olmoe", dataset="bindings-test", **kw)
                self.assertEqual(got_rep, want_rep, extra)
                self.assertGreaterEqual(len(got_rep["phases"]), 1)
            with self.assertRaisesRegex(grace.GraceError, "needs 36864 tokens but the trace has 1500"):
                grace.evaluate(self.ids, plan, model="olmoe", workload="256x128+16")
            with self.assertRaisesRegex(grace.GraceError, "S \\(sequences\\) must be >= 1"):
                grace.evaluate(self.ids, plan, model="olmoe", workload="0x1+1")
            with self.assertRaisesRegex(grace.GraceError, "layers"):
                grace.evaluate(self.ids[:, :1], plan, model="olmoe")
        if hasattr(grace, "export") and cli_has("export"):
            for fmt, ext in (("sglang", "json"), ("vllm-ascend", "json"), ("eplb", "json"), ("trtllm", "yaml")):
                path = os.path.join(self.d, f"export-{fmt}.{ext}")
                cli("export", out, "--format", fmt, "-o", path, "--stats", stats_dir)
                got = grace.export(plan, fmt, expert_load=st["load"])
                with open(path) as f:
                    want_x = f.read() if fmt == "trtllm" else json.load(f)
                self.assertEqual(got, want_x, fmt)
            pm = grace.physical_map(plan)
            self.assertEqual(pm["phy2log"].shape[0], plan["num_layers"])
            np.testing.assert_array_equal(np.array(grace.export(plan, "sglang")["physical_to_logical_map"]),
                                          pm["phy2log"])
            with self.assertRaisesRegex(grace.GraceError, "expert_load"):
                grace.export(plan, "sglang", expert_load=st["load"][:, :3])


    @unittest.skipUnless(hasattr(grace, "plan") and cli_has("plan"), "planner not built yet")
    def test_plan_hardware_same_as_cli(self):
        # The default (priced) method prices with `hardware` as `grace plan --hardware` does; the binding once used
        # it only with slots_per_gpu, so it planned for the default hardware and took any name.
        # An OLMoE-shaped trace: there the two presets give different plans (the 8-expert one plans alike).
        trace = os.path.join(self.d, "olmoe-hw.npy")
        stats_dir = os.path.join(self.d, "stats-hw")
        cli("gen", "--preset", "olmoe", "--tokens", 2048, "--layers", 2, "--seed", 1, "-o", trace)
        cli("profile", trace, "-q", "-o", stats_dir)
        st = grace.load_stats(stats_dir)
        for hw in ("a100-testbed", "h100-ib"):
            out = os.path.join(self.d, f"plan-{hw}.json")
            cli("plan", "--stats", stats_dir, "--topology", "2x2", "--hardware", hw, "-o", out, "-q")
            with open(out) as f:
                want = json.load(f)
            self.assertEqual(grace.plan(st, "2x2", hardware=hw, source=stats_dir), want, hw)
        self.assertNotEqual(want["layers"], grace.plan(st, "2x2", source=stats_dir)["layers"])
        with self.assertRaisesRegex(grace.GraceError, "unknown hardware 'bogus'"):
            grace.plan(st, "2x2", hardware="bogus")

    @unittest.skipUnless(hasattr(grace, "plan") and cli_has("plan"), "planner not built yet")
    def test_robust_plan_from_windows(self):
        out = os.path.join(self.d, "stats-windows")
        W = max(1, len(self.ids) // 5)
        cli("profile", self.trace, "--window-tokens", W, "--topology", "2x2", "-q", "-o", out)
        st = grace.profile(self.ids, self.E, topology="2x2", model="olmoe", dataset="bindings-test", window_tokens=W)
        for name in ("window_load", "window_weight"):
            np.testing.assert_array_equal(st[name], np.load(os.path.join(out, f"{name}.npy")), err_msg=name)
        np.testing.assert_array_equal(st["window_counts"], np.load(os.path.join(out, "window_tokens.npy")))
        path = os.path.join(self.d, "plan-robust.json")
        cli("plan", "--stats", out, "--topology", "2x2", "--robust", "0.9", "-q", "-o", path)
        with open(path) as f:
            want = json.load(f)
        self.assertEqual(grace.plan(grace.load_stats(out), "2x2", robust=0.9, source=want["source"]), want)
        self.assertEqual(grace.plan(st, "2x2", robust=0.9, source=want["source"]), want)
        with self.assertRaisesRegex(grace.GraceError, "re-profile"):
            grace.plan(grace.profile(self.ids, self.E), "2x2", robust=0.9)
        with self.assertRaisesRegex(grace.GraceError, "robust"):
            grace.plan(st, "2x2", robust=1.5)


class Eplb(unittest.TestCase):
    """grace.rebalance_experts: EPLB's README golden vectors (spec section 8), and the NumPy re-statement in
    bench/eplb_reference.py (written from the algorithm, stable sorts, float64) on seeded inputs with ties."""

    README = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]

    def test_golden_vectors(self):
        w = np.array(self.README, dtype=np.int64)
        phy2log, log2phy, logcnt = grace.rebalance_experts(w, 16, 4, 2, 8)
        self.assertEqual(phy2log.tolist(), [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
        self.assertEqual(logcnt.tolist(), [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
        self.assertEqual(log2phy.shape, (2, 12, 2))
        for l in range(2):  # log2phy lists exactly the slots phy2log gives each expert, -1 padded
            for e in range(12):
                slots = [p for p in log2phy[l, e] if p >= 0]
                self.assertEqual(sorted(slots), [p for p in range(16) if phy2log[l, p] == e])
        phy2log, _, logcnt = grace.rebalance_experts(w.astype(np.float32), 16, 3, 2, 8)  # global policy
        self.assertEqual(phy2log.tolist(), [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
                                            [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]])
        self.assertEqual(logcnt.tolist(), [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]])

    def test_matches_numpy_restatement(self):
        sys.path.insert(0, os.path.join(SRC, "bench"))
        import eplb_reference
        for seed, (L, E, P, g, n, G) in enumerate([(4, 16, 24, 4, 2, 8), (6, 64, 80, 8, 2, 8), (3, 64, 72, 7, 2, 4)]):
            rng = np.random.default_rng(seed)
            w = rng.multinomial(2000, np.full(E, 1.0 / E), size=L)  # small counts: many ties
            ours = grace.rebalance_experts(w, P, g, n, G)
            ref = eplb_reference.rebalance_experts(w, P, g, n, G)
            for a, b, name in zip(ours, ref, ("phy2log", "log2phy", "logcnt")):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} for {(L, E, P, g, n, G)}")

    def test_bad_arguments(self):
        w = np.array(self.README)
        with self.assertRaises(grace.GraceError):
            grace.rebalance_experts(w, 15, 4, 2, 8)  # 15 slots on 8 GPUs
        with self.assertRaises(grace.GraceError):
            grace.rebalance_experts(w[0], 16, 4, 2, 8)  # not [L, E]
        with self.assertRaises(grace.GraceError):
            grace.rebalance_experts(w.astype(str), 16, 4, 2, 8)


if __name__ == "__main__":
    unittest.main(verbosity=2)
