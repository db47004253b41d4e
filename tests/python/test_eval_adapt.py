#!/usr/bin/env python3
"""`grace eval --switch-plan P2 --switch-at S`: each part of the trace is priced as `grace eval` prices that slice
with its plan, the migration bytes are the hand-worked ones, and bad flags are one-line errors with nothing
written. `grace eval --adapt N`: without any update it reproduces the plain report; bad flags are one-line errors."""
import json
import os
import subprocess
import tempfile
import unittest

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
E, K, L, T = 4, 1, 1, 40


def load(path):
    with open(path) as f:
        return json.load(f)


def run(*args, ok=True):
    r = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok and r.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {r.stderr}")
    return r


def write_trace(path, ids):
    np.save(path, ids)
    with open(path[:-4] + ".json", "w") as f:
        json.dump({"format": "grace.trace/v1", "num_experts": E, "top_k": K, "num_layers": L}, f)


def write_plan(path, gpu_experts, policy="tar", topo=(2, 2), experts=E):
    layer = {"layer": 0, "gpu_experts": gpu_experts, "primary_gpu": list(range(experts)),
             "routing": {"policy": policy}}
    plan = {"format": "grace.plan/v1", "num_experts": experts, "num_layers": L, "top_k": K,
            "topology": {"nodes": topo[0], "gpus_per_node": topo[1], "slots_per_gpu": None}, "method": "test",
            "layers": [layer]}
    with open(path, "w") as f:
        json.dump(plan, f)


class EvalSwitchAdapt(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.d = cls.tmp.name
        rng = np.random.default_rng(3)
        cls.ids = rng.integers(0, E, size=(T, L, K)).astype(np.int32)
        write_trace(f"{d}/trace.npy", cls.ids)
        write_plan(f"{d}/p1.json", [[0], [1], [2], [3]])
        # Adds expert 1 on GPU 0 (from GPU 1: NVLink), 0 on GPU 2 (from GPU 0: cross-node), 2 on GPU 3 (NVLink).
        write_plan(f"{d}/p2.json", [[0, 1], [1], [0, 2], [2, 3]])
        cls.shape = ["--hidden", 8, "--intermediate", 16]

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_switch_prices_parts_and_migration(self):
        d, S = self.d, 15
        run("eval", "--trace", f"{d}/trace.npy", "--plan", f"{d}/p1.json", "--switch-plan", f"{d}/p2.json",
            "--switch-at", S, "--comm", "hsc", *self.shape, "--weight-bytes", 2, "-o", f"{d}/sw")
        rep = load(f"{d}/sw.json")
        mig = rep["migration"]
        self.assertEqual(mig["bytes_per_expert"], 3 * 8 * 16 * 2)
        self.assertEqual(mig["experts_received"], [1, 0, 1, 1])
        self.assertEqual(mig["cross_node_bytes_in"], [0, 0, 768, 0])
        self.assertEqual(mig["intra_node_bytes_in"], [768, 0, 0, 768])
        self.assertEqual(mig["time_s"], max(mig["intra_node_time_s"], mig["cross_node_time_s"]))
        self.assertGreater(mig["cross_node_time_s"], 0)
        # Each part as grace eval prices that slice of the trace with its plan.
        parts = []
        for name, plan, lo, hi in (("a", "p1", 0, S), ("b", "p2", S, T)):
            write_trace(f"{d}/part_{name}.npy", self.ids[lo:hi])
            run("eval", "--trace", f"{d}/part_{name}.npy", "--plan", f"{d}/{plan}.json", "--comm", "hsc",
                *self.shape, "-o", f"{d}/e_{name}")
            parts.append(load(f"{d}/e_{name}.json")["total"]["end_to_end_s"])
        self.assertEqual([p["total"]["end_to_end_s"] for p in rep["phases"]], parts)
        self.assertAlmostEqual(rep["serving_time_s"], sum(parts), places=15)
        with open(f"{d}/sw.csv") as f:
            csv = f.read().splitlines()
        self.assertEqual(len(csv), 4)
        self.assertTrue(csv[3].startswith("migration,"))

    def test_switch_bad_flags(self):
        d = self.d
        base = ["eval", "--trace", f"{d}/trace.npy", "--plan", f"{d}/p1.json", "--comm", "hsc", *self.shape]
        write_plan(f"{d}/p_1x4.json", [[0], [1], [2], [3]], topo=(1, 4))
        for extra, needle in ((["--switch-plan", f"{d}/p2.json"], "--switch-plan needs --switch-at"),
                              (["--switch-at", 3], "--switch-at needs --switch-plan"),
                              (["--switch-plan", f"{d}/p_1x4.json", "--switch-at", 3], "topology 1x4"),
                              (["--switch-plan", f"{d}/p2.json", "--switch-at", T], f"--switch-at {T}"),
                              (["--switch-plan", f"{d}/p2.json", "--switch-at", 3, "--adapt", 2], "do not combine")):
            r = run(*base, *extra, "-o", f"{d}/bad", ok=False)
            self.assertNotEqual(r.returncode, 0, extra)
            self.assertIn(needle, r.stderr, extra)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertFalse(os.path.exists(f"{d}/bad.json"))

    def test_adapt_without_update_is_plain_eval(self):
        d = self.d
        run("eval", "--trace", f"{d}/trace.npy", "--plan", f"{d}/p2.json", "--comm", "hsc", *self.shape,
            "-o", f"{d}/plain")
        run("eval", "--trace", f"{d}/trace.npy", "--plan", f"{d}/p2.json", "--comm", "hsc", *self.shape,
            "--adapt", 1000, "--adapt-batch-tokens", 3, "-o", f"{d}/ad")
        plain, ad = load(f"{d}/plain.json"), load(f"{d}/ad.json")
        self.assertEqual(ad["adaptation"]["updates"], 0)
        self.assertEqual(ad["adaptation"]["batches"], 4)  # 10 tokens per GPU, 3 per batch
        self.assertEqual(plain["total"], ad["total"])
        run("eval", "--trace", f"{d}/trace.npy", "--plan", f"{d}/p2.json", "--comm", "hsc", *self.shape,
            "--adapt", 1, "--adapt-batch-tokens", 3, "-o", f"{d}/ad1")
        self.assertEqual(load(f"{d}/ad1.json")["adaptation"]["updates"], 4)

    def test_adapt_bad_flags(self):
        d = self.d
        base = ["eval", "--trace", f"{d}/trace.npy", "--comm", "hsc", *self.shape]
        write_plan(f"{d}/p_primary.json", [[0, 1], [1], [0, 2], [2, 3]], policy="primary")
        for extra, needle in ((["--plan", f"{d}/p_primary.json", "--adapt", 2], "wrr or tar"),
                              (["--plan", f"{d}/p2.json", "--adapt", 2, "--adapt-decay", 1], "--adapt-decay"),
                              (["--plan", f"{d}/p2.json", "--adapt", 0], "--adapt"),
                              (["--plan", f"{d}/p2.json", "--adapt-batch-tokens", 4], "--adapt-batch-tokens")):
            r = run(*base, *extra, "-o", f"{d}/bad", ok=False)
            self.assertNotEqual(r.returncode, 0, extra)
            self.assertIn(needle, r.stderr, extra)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertFalse(os.path.exists(f"{d}/bad.json"))


if __name__ == "__main__":
    unittest.main()
