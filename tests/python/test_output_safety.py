#!/usr/bin/python3
"""CLI output safety (issue #15, defects 2, 6, 8): grace never replaces a folder it did not write, outputs that belong
together appear together, temporaries of killed runs are cleaned, and write errors name the target and the cause."""
import json
import os
import re
import resource
import signal
import subprocess
import tempfile
import unittest

import numpy as np

GRACE = os.path.abspath(os.environ.get("GRACE_BIN", "build/tools/grace/grace"))


def run(*args, ok=True, cwd=None, fsize=None):
    def limit():
        # A file-size limit makes any write past `fsize` bytes fail with EFBIG, deterministically (no full disk needed).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    p = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       preexec_fn=limit if fsize is not None else None)
    if ok and p.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {p.stderr}")
    return p


def tree(folder):
    """Every file under `folder` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


class OutputSafety(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.base = cls.tmp.name
        cls.trace = os.path.join(cls.base, "t.npy")
        run("gen", "--preset", "olmoe", "--tokens", 600, "--layers", 2, "--seed", 3, "-o", cls.trace)
        cls.stats = os.path.join(cls.base, "t.stats")
        run("profile", cls.trace, "-q", "-o", cls.stats)
        cls.plan = os.path.join(cls.base, "plan.json")
        run("plan", "--stats", cls.stats, "--topology", "2x2", "--method", "grace", "-q", "-o", cls.plan)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.d = tempfile.mkdtemp(dir=self.base)

    def user_folder(self):
        """A folder the user owns: a trace and a note, like the one `-o "$PWD"` names."""
        work = os.path.join(self.d, "work")
        os.mkdir(work)
        np.save(os.path.join(work, "mine.npy"), np.arange(6, dtype=np.int32).reshape(3, 1, 2))
        with open(os.path.join(work, "notes.txt"), "w") as f:
            f.write("keep me\n")
        return work

    def assert_refused(self, p, folder, kind):
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.strip().splitlines(),
                         [f"grace: error: refusing to replace folder {folder}: it is not a grace {kind} output "
                          f"(no .grace-output marker); choose another -o or remove it"])

    def test_folder_outputs_refuse_a_user_folder_and_keep_its_files(self):
        cases = [
            ("stats", ["profile", self.trace, "-q", "-o"]),
            ("stats", ["import-stats", "--coactivation", os.path.join(self.stats, "affinity.npy"), "--top-k", 8, "-o"]),
            ("compare", ["compare", "--trace", self.trace, "--topology", "2x2", "-o"]),
            ("demo", ["demo", "--tokens", 256, "-o"]),
            ("eplb-export", ["export", self.plan, "--format", "eplb", "-o"]),
        ]
        for kind, args in cases:
            with self.subTest(command=args[0]):
                work = self.user_folder()
                before = tree(work)
                self.assert_refused(run(*args, work, ok=False), work, kind)
                self.assertEqual(tree(work), before)
                self.assertEqual(sorted(os.listdir(self.d)), ["work"])  # no temporaries beside it
                for name in os.listdir(work):
                    os.remove(os.path.join(work, name))
                os.rmdir(work)

    def test_dot_as_output_folder_is_refused(self):
        work = self.user_folder()
        before = tree(work)
        p = run("profile", self.trace, "-q", "-o", ".", ok=False, cwd=work)
        self.assert_refused(p, ".", "stats")
        self.assertEqual(tree(work), before)

    def test_rerun_into_own_output_folder_and_refuse_added_user_file(self):
        out = os.path.join(self.d, "s")
        run("profile", self.trace, "-q", "-o", out)
        with open(os.path.join(out, ".grace-output")) as f:
            marker = json.load(f)
        self.assertEqual(marker["kind"], "stats")
        self.assertEqual(marker["files"], ["affinity.npy", "load.npy", "meta.json"])
        run("profile", self.trace, "-q", "--topology", "2x2", "-o", out)
        self.assertIn("source_load.npy", os.listdir(out))
        self.assertEqual(sorted(os.listdir(self.d)), ["s"])
        # An earlier stats folder is not a compare output, and a file the user added makes it not grace's alone.
        p = run("compare", "--trace", self.trace, "--topology", "2x2", "-o", out, ok=False)
        self.assertIn("it is a grace stats output, not a compare output", p.stderr)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("mine")
        p = run("profile", self.trace, "-q", "-o", out, ok=False)
        self.assertEqual(p.stderr.strip(), f"grace: error: refusing to replace folder {out}: it holds notes.txt, "
                                           f"which grace did not write; choose another -o or remove it")
        self.assertTrue(os.path.exists(os.path.join(out, "notes.txt")))

    def test_eplb_export_folder_reruns(self):
        out = os.path.join(self.d, "eplb")
        for _ in range(2):
            run("export", self.plan, "--format", "eplb", "-o", out)
        self.assertEqual(sorted(os.listdir(out)), [".grace-output", "log2phy.npy", "logcnt.npy", "phy2log.npy"])

    def test_gen_into_a_folder_path_leaves_no_new_files(self):
        os.mkdir(os.path.join(self.d, "t.npy"))
        p = run("gen", "--tokens", 50, "-o", os.path.join(self.d, "t.npy"), ok=False)
        self.assertEqual(p.stderr.strip(), "grace: error: output path is a folder: " + os.path.join(self.d, "t.npy"))
        self.assertEqual(sorted(os.listdir(self.d)), ["t.npy"])
        self.assertEqual(os.listdir(os.path.join(self.d, "t.npy")), [])

    def test_stale_temporaries_of_a_dead_run_are_cleaned(self):
        dead, alive = dead_pid(), os.getpid()
        names = [f".t.npy.tmp.{dead}.0", f".t.weights.npy.tmp.{dead}.4", f".t.npy.tmp.{alive}.1", "notes.txt"]
        for n in names:
            with open(os.path.join(self.d, n), "wb") as f:
                f.write(b"x" * 1000)
        run("gen", "--tokens", 50, "-o", os.path.join(self.d, "t.npy"))
        self.assertEqual(sorted(os.listdir(self.d)),
                         sorted([f".t.npy.tmp.{alive}.1", "notes.txt", "t.json", "t.npy", "t.weights.npy"]))

    def consistent_trace(self, path):
        """The metadata, if present, describes the ids and weights beside it (same token count, same shape)."""
        meta_path = path[:-4] + ".json"
        if not os.path.exists(meta_path):
            return None
        with open(meta_path) as f:
            meta = json.load(f)
        ids = np.load(path, mmap_mode="r")
        weights = np.load(os.path.join(self.d, meta["weights"]), mmap_mode="r")
        self.assertEqual(ids.shape[0], meta["num_tokens"])
        self.assertEqual(weights.shape, ids.shape)
        return meta["num_tokens"]

    def test_kill_9_during_gen_keeps_a_consistent_trace_and_the_next_run_cleans_up(self):
        path = os.path.join(self.d, "t.npy")
        run("gen", "--tokens", 1000, "--seed", 1, "-o", path)
        p = subprocess.Popen([GRACE, "gen", "--tokens", "100000", "--seed", "2", "-o", path], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            # Kill it while it writes (a temporary exists); if it finishes first, the check below still holds.
            while p.poll() is None and not any(".tmp." in n for n in os.listdir(self.d)):
                pass
            p.kill()
        finally:
            p.wait()
        self.assertIn(self.consistent_trace(path), (None, 1000, 100000))
        run("gen", "--tokens", 500, "--seed", 3, "-o", path)
        self.assertEqual(sorted(os.listdir(self.d)), ["t.json", "t.npy", "t.weights.npy"])  # leftovers cleaned
        self.assertEqual(self.consistent_trace(path), 500)

    def test_eval_json_and_csv_appear_together(self):
        stem = os.path.join(self.d, "r")
        run("eval", "--trace", self.trace, "--plan", self.plan, "--comm", "hsc", "-o", stem)
        self.assertEqual(sorted(os.listdir(self.d)), ["r.csv", "r.json"])
        sizes = {ext: os.path.getsize(stem + ext) for ext in (".json", ".csv")}
        # Too little room for the larger file: neither appears, and the error names it and the cause.
        big = max(sizes, key=sizes.get)
        stem2 = os.path.join(self.d, "r2")
        p = run("eval", "--trace", self.trace, "--plan", self.plan, "--comm", "hsc", "-o", stem2, ok=False,
                fsize=sizes[big] - 1)
        self.assertEqual(p.stderr.strip(), f"grace: error: cannot write {stem2}{big}: File too large")
        self.assertEqual(sorted(os.listdir(self.d)), ["r.csv", "r.json"])

    def test_adapt_switch_and_workload_reports_appear_together(self):
        # The session-4 evaluation modes write REPORT.json and REPORT.csv together or not at all, and a refused
        # run leaves an earlier report as it was.
        plan2 = os.path.join(self.base, "plan-paper.json")
        if not os.path.exists(plan2):
            run("plan", "--stats", self.stats, "--topology", "2x2", "--method", "grace-paper", "-q", "-o", plan2)
        base = ["eval", "--trace", self.trace, "--plan", self.plan, "--comm", "hsc"]
        for name, extra in (("adapt", ["--adapt", 2, "--adapt-batch-tokens", 16]),
                            ("switch", ["--switch-plan", plan2, "--switch-at", 300]),
                            ("workload", ["--workload", "4x50+5", "--batch-tokens", 64])):
            with self.subTest(name):
                stem = os.path.join(self.d, name)
                run(*base, "-o", stem, *extra)
                self.assertTrue(os.path.isfile(stem + ".json") and os.path.isfile(stem + ".csv"))
                before = tree(self.d)
                big = os.path.getsize(stem + ".json")
                p = run(*base, "-o", stem, *extra, ok=False, fsize=big - 1)
                self.assertIn("File too large", p.stderr)
                self.assertEqual(tree(self.d), before)
                p = run(*base, "-o", stem, *extra, "--switch-at", 600, ok=False)  # past the trace (or no plan)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertEqual(tree(self.d), before)

    def test_write_error_names_the_target_and_keeps_the_old_trace(self):
        path = os.path.join(self.d, "t.npy")
        run("gen", "--tokens", 50, "--seed", 1, "-o", path)
        before = tree(self.d)
        p = run("gen", "--tokens", 5000, "--seed", 2, "-o", path, ok=False, fsize=4096)
        self.assertEqual(p.stderr.strip(), f"grace: error: cannot write {self.d}/t.weights.npy: File too large")
        self.assertEqual(tree(self.d), before)  # the old ids, weights and metadata, unchanged and together

    def test_stats_folder_write_error_names_the_folder(self):
        out = os.path.join(self.d, "s")
        p = run("profile", self.trace, "-q", "-o", out, ok=False, fsize=2048)
        self.assertRegex(p.stderr.strip(), "^grace: error: cannot write " + re.escape(out) + r"/\w+\.npy: File too large$")
        self.assertEqual(os.listdir(self.d), [])


if __name__ == "__main__":
    unittest.main()
