#!/usr/bin/env python3
"""`grace replan`: the moves it reports rebuild the plan it writes (an independent replay of the slot rewrites on
the old plan), the budgets hold, slot counts stay, the predicted time does not rise, and bad input is a one-line
error with nothing written."""
import json
import os
import subprocess
import tempfile
import unittest

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")


def load(path):
    with open(path) as f:
        return json.load(f)


def run(*args, ok=True):
    r = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok and r.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {r.stderr}")
    return r


class Replan(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.d = cls.tmp.name
        for ds in ("wikitext", "github"):
            run("gen", "--preset", "olmoe", "--dataset", ds, "--tokens", 4096, "--seed", 3, "-o", f"{d}/{ds}.npy")
            run("profile", f"{d}/{ds}.npy", "--topology", "2x4", "-q", "-o", f"{d}/st_{ds}")
        run("plan", "--stats", f"{d}/st_wikitext", "--topology", "2x4", "--slots-per-gpu", 9, "-q",
            "-o", f"{d}/old.json")
        cls.old = load(f"{d}/old.json")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def replan(self, *budget):
        d = self.d
        for f in ("new.json", "moves.json"):
            if os.path.exists(f"{d}/{f}"):
                os.remove(f"{d}/{f}")
        out = run("replan", "--plan", f"{d}/old.json", "--stats", f"{d}/st_github", *budget, "-q",
                  "-o", f"{d}/new.json", "--moves", f"{d}/moves.json").stdout
        return out, load(f"{d}/new.json"), load(f"{d}/moves.json")

    def test_moves_rebuild_the_plan(self):
        out, new, rep = self.replan("--max-moves", 12)
        moves = rep["moves"]
        self.assertLessEqual(len(moves), 12)
        self.assertGreater(len(moves), 0)  # a shifted domain leaves something to gain
        self.assertEqual(rep["num_moves"], len(moves))
        self.assertAlmostEqual(rep["bytes_moved"], len(moves) * rep["bytes_per_expert"])
        self.assertEqual(rep["bytes_per_expert"], 3 * 2048 * 1024 * 2)  # olmoe H, I, bf16
        held = [[set(g) for g in lay["gpu_experts"]] for lay in self.old["layers"]]
        for m in moves:
            g = held[m["layer"]][m["gpu"]]
            self.assertIn(m["removed"], g)
            self.assertNotIn(m["added"], g)
            self.assertGreater(m["gain_seconds"], 0)
            g.remove(m["removed"])
            g.add(m["added"])
            count = sum(m["removed"] in h for h in held[m["layer"]])
            self.assertGreaterEqual(count, 1, "a move left an expert without an instance")
        for lay, want in zip(new["layers"], held):
            self.assertEqual([set(g) for g in lay["gpu_experts"]], want)
            self.assertTrue(all(len(g) == 9 for g in lay["gpu_experts"]))  # still slot-exact
            for e, p in enumerate(lay["primary_gpu"]):
                self.assertIn(e, lay["gpu_experts"][p])
        self.assertLessEqual(rep["predicted_seconds_after"], rep["predicted_seconds_before"])
        self.assertAlmostEqual(rep["predicted_seconds_before"] - rep["predicted_seconds_after"],
                               sum(m["gain_seconds"] for m in moves), places=9)
        self.assertIn(f"{len(moves)} of {9 * 8 * 16} instances rewritten", out)

    def test_budgets(self):
        _, new, rep = self.replan("--max-bytes", 3 * 2048 * 1024 * 2 - 1)  # less than one expert
        self.assertEqual(rep["moves"], [])
        self.assertEqual([lay["gpu_experts"] for lay in new["layers"]],
                         [lay["gpu_experts"] for lay in self.old["layers"]])
        _, _, rep = self.replan("--max-bytes", 3 * 3 * 2048 * 1024 * 2)
        self.assertLessEqual(len(rep["moves"]), 3)
        _, _, rep = self.replan("--max-moves-fraction", 0.01)
        self.assertLessEqual(len(rep["moves"]), int(0.01 * 9 * 8 * 16))

    def test_bad_input(self):
        d = self.d
        run("gen", "--preset", "mixtral", "--tokens", 512, "--seed", 1, "-o", f"{d}/mx.npy")
        run("profile", f"{d}/mx.npy", "-q", "-o", f"{d}/st_mx")
        cases = [
            ([], "needs a budget"),
            (["--max-moves", 3, "--max-moves-fraction", 0.1], "not both"),
            (["--max-moves", -1], "--max-moves"),
            (["--max-moves-fraction", 2], "--max-moves-fraction"),
            (["--max-moves", 3, "--weight-bytes", 0], "--weight-bytes"),
        ]
        for extra, needle in cases:
            r = run("replan", "--plan", f"{d}/old.json", "--stats", f"{d}/st_github", "-o", f"{d}/bad.json", *extra,
                    ok=False)
            err = r.stderr.strip()
            self.assertNotEqual(r.returncode, 0, extra)
            self.assertEqual(err.count("\n"), 0, err)
            self.assertIn(needle, err, extra)
            self.assertFalse(os.path.exists(f"{d}/bad.json"))
        # The plan and the moves are committed together: the same path for both is refused, nothing written.
        r = run("replan", "--plan", f"{d}/old.json", "--stats", f"{d}/st_github", "--max-moves", 3, "-o",
                f"{d}/bad.json", "--moves", f"{d}/bad.json", ok=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("written twice", r.stderr)
        self.assertFalse(os.path.exists(f"{d}/bad.json"))
        r = run("replan", "--plan", f"{d}/old.json", "--stats", f"{d}/st_mx", "--max-moves", 3, "-o",
                f"{d}/bad.json", ok=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("E=8", r.stderr)
        self.assertFalse(os.path.exists(f"{d}/bad.json"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
