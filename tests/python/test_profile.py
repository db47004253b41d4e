#!/usr/bin/python3
"""Cross-checks `grace profile` and `grace import-stats` against independent NumPy computations (spec §2)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
C2R = os.path.join(SRC, "tests", "data", "real", "c2r-coactivation")


def run(*args, ok=True):
    p = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {p.stderr}")
    return p


def reference(trace, E, G=0):
    """Per layer: A by explicit set membership (one-hot products), loads, per-source loads."""
    T, L, k = trace.shape
    A = np.zeros((L, E, E), dtype=np.int64)
    load = np.zeros((L, E), dtype=np.int64)
    src = np.zeros((L, G, E), dtype=np.int64)
    home = (np.arange(T, dtype=np.int64) * G) // T if G else None
    for l in range(L):
        X = np.zeros((T, E), dtype=np.int64)
        np.put_along_axis(X, trace[:, l, :].astype(np.int64), 1, axis=1)
        A[l] = X.T @ X
        np.fill_diagonal(A[l], 0)
        load[l] = X.sum(0)
        for g in range(G):
            src[l, g] = X[home == g].sum(0)
    return A, load, src


class ProfileCrossCheck(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.d, name)

    def test_generated_traces_match_numpy(self):
        for preset, ds, topo in [("olmoe", "arxiv", "2x2"), ("mixtral", "c4", "1x3"), ("deepseek-v2-lite", "mixed", "3x2")]:
            trace_path = self.path(f"{preset}.npy")
            run("gen", "--preset", preset, "--dataset", ds, "--tokens", 3001, "--layers", 3, "--seed", 5, "-o", trace_path)
            trace = np.load(trace_path)
            meta = json.load(open(self.path(f"{preset}.json")))
            E = meta["num_experts"]
            n, m = map(int, topo.split("x"))
            out = run("profile", trace_path, "--topology", topo, "--threads", 2, "--chunk", 1000, "-o", self.path("s"))
            self.assertIn("layer", out.stdout)
            A, load, src = reference(trace, E, n * m)
            np.testing.assert_array_equal(np.load(self.path("s/affinity.npy")), A)
            np.testing.assert_array_equal(np.load(self.path("s/load.npy")), load)
            np.testing.assert_array_equal(np.load(self.path("s/source_load.npy")), src)
            sm = json.load(open(self.path("s/meta.json")))
            self.assertEqual(sm["format"], "grace.stats/v1")
            self.assertEqual((sm["num_tokens"], sm["num_layers"], sm["num_experts"], sm["top_k"], sm["num_gpus"]),
                             (3001, 3, E, trace.shape[2], n * m))
            self.assertEqual(sm["model"], preset)
            self.assertEqual(sm["dataset"], ds)

    def test_thread_counts_give_identical_bytes(self):
        run("gen", "--preset", "qwen3-30b-a3b", "--tokens", 4000, "--layers", 5, "-o", self.path("t.npy"))
        for th in (1, 2, 3):
            run("profile", self.path("t.npy"), "-q", "--topology", "2x4", "--threads", th, "-o", self.path(f"s{th}"))
        for f in ("affinity.npy", "load.npy", "source_load.npy", "meta.json"):
            ref = open(self.path(f"s1/{f}"), "rb").read()
            for th in (2, 3):
                self.assertEqual(ref, open(self.path(f"s{th}/{f}"), "rb").read(), f)

    def test_foreign_two_dimensional_trace_with_flags(self):
        # A [T, k] big-endian int16 trace from elsewhere, no metadata: E comes from --experts.
        rng = np.random.default_rng(0)
        T, k, E = 999, 4, 16
        ids = np.array([rng.choice(E, k, replace=False) for _ in range(T)], dtype=">i2")
        np.save(self.path("foreign.npy"), ids)
        run("profile", self.path("foreign.npy"), "--experts", E, "--model", "x", "-o", self.path("s"))
        A, load, _ = reference(ids.astype(np.int64)[:, None, :], E)
        np.testing.assert_array_equal(np.load(self.path("s/affinity.npy")), A)
        np.testing.assert_array_equal(np.load(self.path("s/load.npy")), load)

    def test_bad_inputs_fail_with_one_line(self):
        np.save(self.path("rep.npy"), np.array([[0, 1], [2, 2]], dtype=np.int32))
        p = run("profile", self.path("rep.npy"), "--experts", 4, "-o", self.path("s"), ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertTrue(p.stderr.startswith("grace: error:") and p.stderr.count("\n") == 1, p.stderr)
        self.assertIn("repeated", p.stderr)
        self.assertFalse(os.path.exists(self.path("s")))
        run("gen", "--tokens", 10, "-o", self.path("t.npy"))
        p = run("profile", self.path("t.npy"), "-o", self.path("missing/s"), ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        self.assertFalse(os.path.exists(self.path("missing")))
        p = run("profile", self.path("t.npy"), "--topology", "2x0", "-o", self.path("s"), ok=False)
        self.assertNotEqual(p.returncode, 0)

    def write_trace(self, name, ids, E, dataset):
        np.save(self.path(name + ".npy"), ids.astype(np.int32))
        with open(self.path(name + ".json"), "w") as f:
            json.dump({"format": "grace.trace/v1", "num_experts": E, "model": "m", "dataset": dataset}, f)
        return self.path(name + ".npy")

    def random_ids(self, T, L, k, E, seed):
        rng = np.random.default_rng(seed)
        pop = np.exp(rng.normal(0, 1.5, E))
        return np.array([[rng.choice(E, k, replace=False, p=pop / pop.sum()) for _ in range(L)] for _ in range(T)])

    def test_mix_of_two_traces_matches_numpy(self):
        E, L, k = 12, 2, 3
        a_ids, b_ids = self.random_ids(700, L, k, E, 1), self.random_ids(300, L, k, E, 2)
        a, b = self.write_trace("a", a_ids, E, "da"), self.write_trace("b", b_ids, E, "db")
        # Token weighting (the default) is the concatenation; source loads split each trace over the GPUs.
        out = run("profile", a, b, "--topology", "1x2", "-q", "-o", self.path("cat")).stdout
        self.assertIn("T=1000", out)
        A1, l1, s1 = reference(a_ids, E, 2)
        A2, l2, s2 = reference(b_ids, E, 2)
        np.testing.assert_array_equal(np.load(self.path("cat/affinity.npy")), A1 + A2)
        np.testing.assert_array_equal(np.load(self.path("cat/load.npy")), l1 + l2)
        np.testing.assert_array_equal(np.load(self.path("cat/source_load.npy")), s1 + s2)
        meta = json.load(open(self.path("cat/meta.json")))
        self.assertEqual(meta["dataset"], "da+db")
        self.assertEqual([(s["trace"], s["num_tokens"], s["weight"]) for s in meta["sources"]],
                         [(a, 700, 700), (b, 300, 300)])
        # --mix 1,3: a gets 1/4 of 1000 tokens (scale 250/700), b 3/4 (scale 750/300); sums rounded half away.
        run("profile", a, b, "--mix", "1,3", "--topology", "1x2", "-q", "-o", self.path("mix"))
        sa, sb = 0.25 * 1000 / 700, 0.75 * 1000 / 300
        rnd = lambda x: np.floor(x + 0.5).astype(np.int64)  # counts are >= 0
        np.testing.assert_array_equal(np.load(self.path("mix/load.npy")), rnd(sa * l1 + sb * l2))
        np.testing.assert_array_equal(np.load(self.path("mix/affinity.npy")), rnd(sa * A1 + sb * A2))
        np.testing.assert_array_equal(np.load(self.path("mix/source_load.npy")), rnd(sa * s1 + sb * s2))
        meta = json.load(open(self.path("mix/meta.json")))
        self.assertEqual([s["weight"] for s in meta["sources"]], [1, 3])
        self.assertAlmostEqual(meta["sources"][1]["scale"], sb)

    def test_mix_and_windows_give_identical_bytes_for_any_thread_count(self):
        run("gen", "--preset", "olmoe", "--dataset", "arxiv", "--tokens", 3000, "--layers", 3, "-o", self.path("a.npy"))
        run("gen", "--preset", "olmoe", "--dataset", "github", "--tokens", 2000, "--layers", 3, "-o", self.path("b.npy"))
        for th in (1, 2):
            run("profile", self.path("a.npy"), self.path("b.npy"), "--mix", "2,1", "--window-tokens", 700,
                "--topology", "2x2", "-q", "--threads", th, "-o", self.path(f"s{th}"))
        files = sorted(os.listdir(self.path("s1")))
        self.assertEqual(files, sorted(os.listdir(self.path("s2"))))
        for f in ("affinity.npy", "load.npy", "source_load.npy", "window_load.npy", "window_tokens.npy",
                  "window_weight.npy", "meta.json"):
            self.assertIn(f, files)
            self.assertEqual(open(self.path(f"s1/{f}"), "rb").read(), open(self.path(f"s2/{f}"), "rb").read(), f)
        # Windows never span the two traces: 3000 -> 5 windows (4 x 700 + 200), 2000 -> 3 (2 x 700 + 600).
        np.testing.assert_array_equal(np.load(self.path("s1/window_tokens.npy")), [700] * 4 + [200, 700, 700, 600])
        w = np.load(self.path("s1/window_weight.npy"))
        np.testing.assert_allclose(w, [2 / 3 * 5000 / 3000] * 5 + [1 / 3 * 5000 / 2000] * 3)
        wl = np.load(self.path("s1/window_load.npy"))
        _, la, _ = reference(np.load(self.path("a.npy")), 64)
        np.testing.assert_array_equal(wl[:, :5].sum(1), la)

    def test_robust_plan_uses_window_quantiles(self):
        run("gen", "--preset", "olmoe", "--dataset", "arxiv", "--tokens", 4000, "--layers", 2, "-o", self.path("t.npy"))
        run("profile", self.path("t.npy"), "--window-tokens", 500, "-q", "-o", self.path("s"))
        run("plan", "--stats", self.path("s"), "--topology", "2x2", "--robust", "0.9", "-q", "-o", self.path("p.json"))
        plan = json.load(open(self.path("p.json")))
        self.assertIn("robust q=0.9", plan["source"])
        wl = np.load(self.path("s/window_load.npy")).astype(float)  # [L, W, E], 8 equal windows of 500
        load = np.load(self.path("s/load.npy")).astype(float)
        q = np.sort(wl / 500, axis=1)[:, int(np.ceil(0.9 * 8)) - 1, :]  # lower quantile: 8th... 0.9*8=7.2 -> 8th
        robust = q / q.sum(1, keepdims=True) * load.sum(1, keepdims=True)
        for lay in plan["layers"]:
            l = lay["layer"]
            before = np.bincount(lay["primary_gpu"], weights=robust[l], minlength=4)
            np.testing.assert_allclose(before, lay["gpu_load_before"], rtol=1e-9)
            np.testing.assert_allclose(sum(lay["predicted_gpu_load"]), load[l].sum(), rtol=1e-9)
        # The mean plan differs from it (another load profile) but has the same total.
        run("plan", "--stats", self.path("s"), "--topology", "2x2", "-q", "-o", self.path("m.json"))
        mean = json.load(open(self.path("m.json")))
        self.assertNotEqual([l["gpu_load_before"] for l in mean["layers"]], [l["gpu_load_before"] for l in plan["layers"]])

    def test_mix_bad_inputs_fail_with_one_line(self):
        a = self.write_trace("a", self.random_ids(50, 2, 3, 12, 1), 12, "da")
        b = self.write_trace("b", self.random_ids(50, 2, 3, 16, 2), 16, "db")
        c = self.write_trace("c", self.random_ids(50, 1, 3, 12, 3), 12, "dc")
        cases = [
            ((a, b), f"{b} has E=16 but {a} has E=12"),
            ((a, c), f"{c} has L=1 but {a} has L=2"),
            ((a, a, "--mix", "1"), "--mix gives 1 weights for 2 traces"),
            ((a, a, "--mix", "1,-2"), "--mix weight 2 is '-2'"),
            ((a, a, "--mix", "1,inf"), "finite numbers > 0"),
            ((a, a, "--mix", "1,,2"), "--mix weight 2 is ''"),
            ((a, a, "--weights", self.path("w.npy")), "--weights names the gate weights of one trace"),
            ((a, "--window-tokens", "-1"), "--window-tokens"),
        ]
        for args, needle in cases:
            p = run("profile", *args, "-q", "-o", self.path("s"), ok=False)
            self.assertIn(p.returncode, (1, 2), args)
            err = p.stderr.strip()
            self.assertTrue(err.startswith("grace: error:") and "\n" not in err and needle in err, (args, err))
            self.assertFalse(os.path.exists(self.path("s")))
        p = run("profile", "-o", self.path("s"), ok=False)
        self.assertEqual(p.returncode, 2)

    def test_c2r_import_matches_the_real_files(self):
        C = np.load(os.path.join(C2R, "llama_moe_coactivation_base.npy"))
        Lc = np.load(os.path.join(C2R, "llama_moe_expert_load_base.npy"))
        coact, load = os.path.join(C2R, "llama_moe_coactivation_base.npy"), os.path.join(C2R, "llama_moe_expert_load_base.npy")
        # C2R's entries already count tokens per pair (odd entries exist, row sums equal the loads): no halving.
        run("import-stats", "--coactivation", coact, "--load", load, "--top-k", 2, "-o", self.path("c2r"))
        A = np.load(self.path("c2r/affinity.npy"))
        expect = C.copy()
        for l in range(len(expect)):
            np.fill_diagonal(expect[l], 0)
        np.testing.assert_array_equal(A, expect)
        np.testing.assert_array_equal(np.load(self.path("c2r/load.npy")), Lc)
        np.testing.assert_array_equal(A.sum(2), Lc)  # k = 2: each token holding i pairs it with one other
        self.assertEqual(json.load(open(self.path("c2r/meta.json")))["num_tokens"], 204800)
        # Derived loads (no --load) agree.
        run("import-stats", "--coactivation", coact, "--top-k", 2, "-o", self.path("c2r_derived"))
        np.testing.assert_array_equal(np.load(self.path("c2r_derived/load.npy")), Lc)
        # --ordered-pairs on the real files is refused: an odd entry cannot be 2*A.
        p = run("import-stats", "--coactivation", coact, "--ordered-pairs", "--top-k", 2, "-o", self.path("bad"), ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("odd", p.stderr)
        self.assertFalse(os.path.exists(self.path("bad")))
        # Halving: a matrix counting each pair twice (2*A) imports to A.
        np.save(self.path("twice.npy"), 2 * expect)
        run("import-stats", "--coactivation", self.path("twice.npy"), "--ordered-pairs", "--top-k", 2, "-o", self.path("half"))
        np.testing.assert_array_equal(np.load(self.path("half/affinity.npy")), expect)
        np.testing.assert_array_equal(np.load(self.path("half/load.npy")), Lc)
        # An asymmetric matrix is refused.
        bad = expect.copy()
        bad[0, 0, 1] += 2
        np.save(self.path("asym.npy"), bad)
        p = run("import-stats", "--coactivation", self.path("asym.npy"), "--top-k", 2, "-o", self.path("bad"), ok=False)
        self.assertIn("symmetric", p.stderr)


if __name__ == "__main__":
    sys.exit(0 if unittest.main(exit=False).result.wasSuccessful() else 1)
