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
