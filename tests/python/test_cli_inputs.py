#!/usr/bin/python3
"""Bad command-line inputs (issue #15, defects 7 and 8): every option's range is checked at parse time, gate
weights are read and checked by every command that reads a trace, a plan must match the trace's E, L and k, and
the messages say what is wrong (a folder, a missing file) and name the option and value. Each case asserts a
non-zero exit, a single `grace: error:` line and the words that must be in it."""
import json
import os
import subprocess
import tempfile
import unittest

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")


def run(*args):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)


class CliInputs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.d = cls.tmp.name
        cls.trace = cls.path("t.npy")
        for args in (["gen", "--preset", "olmoe", "--tokens", 300, "--layers", 2, "-o", cls.trace],
                     ["gen", "--preset", "mixtral", "--tokens", 300, "--layers", 2, "-o", cls.path("k2.npy")],
                     ["gen", "--preset", "olmoe", "--tokens", 300, "--layers", 3, "-o", cls.path("l3.npy")],
                     ["plan", "--trace", cls.trace, "--topology", "2x2", "-q", "-o", cls.path("p.json")],
                     ["profile", cls.trace, "-q", "-o", cls.path("stats")]):
            p = run(*args)
            assert p.returncode == 0, p.stderr
        cls.weights = np.load(cls.path("t.weights.npy"))
        cls.plan = cls.path("p.json")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def path(cls, name):
        return os.path.join(cls.d, name)

    def assert_error(self, args, *needles):
        p = run(*args)
        self.assertNotEqual(p.returncode, 0, f"grace {' '.join(map(str, args))} succeeded")
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertTrue(lines[0].startswith("grace: error: "), p.stderr)
        for needle in needles:
            self.assertIn(needle, lines[0])
        return lines[0]

    def eval_args(self, *extra, trace=None, plan=None):
        return ["eval", "--trace", trace or self.trace, "--plan", plan or self.plan, "--comm", "hsc",
                "-o", self.path("rep"), *extra]

    def save_weights(self, name, w):
        np.save(self.path(name), w)
        return self.path(name)

    # --- option ranges, every subcommand -------------------------------------------------------------------------

    def test_option_ranges(self):
        t, out = self.trace, self.path("out")
        cases = [
            # gen
            (["gen", "--tokens", 0, "-o", out + ".npy"], "--tokens", "'0'"),
            (["gen", "--tokens", "1.5", "-o", out + ".npy"], "--tokens", "'1.5'"),
            (["gen", "--seed", -1, "-o", out + ".npy"], "--seed", "'-1'"),
            (["gen", "--seed", 2**64, "-o", out + ".npy"], "--seed", str(2**64)),
            (["gen", "--layers", -1, "-o", out + ".npy"], "--layers", "'-1'"),
            (["gen", "--seq-len", 0, "-o", out + ".npy"], "--seq-len", "'0'"),
            (["gen", "--threads", -1, "-o", out + ".npy"], "--threads", "'-1'"),
            (["gen", "--dataset", "bogus", "-o", out + ".npy"], "--dataset", "bogus"),
            (["gen", "--preset", "bogus", "-o", out + ".npy"], "--preset", "bogus"),
            # profile
            (["profile", t, "-o", out, "--threads", -1], "--threads", "'-1'"),
            (["profile", t, "-o", out, "--threads", 100000], "--threads", "'100000'"),
            (["profile", t, "-o", out, "--chunk", 0], "--chunk", "'0'"),
            (["profile", t, "-o", out, "--experts", 0], "--experts", "'0'"),
            (["profile", t, "-o", out, "--topology", "0x2"], "--topology", "0x2"),
            # plan
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--seed", -1], "--seed", "'-1'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--threads", -1], "--threads", "'-1'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--wrr-period", 0], "--wrr-period", "'0'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--slots-per-gpu", 0], "--slots-per-gpu", "'0'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--method", "bogus"], "--method", "bogus"),
            (["plan", "--trace", t, "--topology", "2", "-o", out], "--topology", "'2'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--experts", -3], "--experts", "'-3'"),
            # eval
            (self.eval_args("--hidden", 0), "--hidden", "'0'"),
            (self.eval_args("--hidden", -1), "--hidden", "'-1'"),
            (self.eval_args("--intermediate", 0), "--intermediate", "'0'"),
            (self.eval_args("--threads", -1), "--threads", "'-1'"),
            (self.eval_args("--chunk", 0), "--chunk", "'0'"),
            (self.eval_args("--routing", "bogus"), "--routing", "bogus"),
            (self.eval_args("--hardware", "bogus"), "--hardware", "bogus"),
            (self.eval_args("--topology", "2y2"), "--topology", "2y2"),
            (["eval", "--trace", t, "--plan", self.plan, "--comm", "bogus", "-o", out], "--comm", "bogus"),
            # compare
            (["compare", "--trace", t, "-o", out, "--reference", "bogus"], "--reference", "bogus"),
            (["compare", "--trace", t, "-o", out, "--seed", -1], "--seed", "'-1'"),
            (["compare", "--trace", t, "-o", out, "--threads", -1], "--threads", "'-1'"),
            (["compare", "--trace", t, "-o", out, "--topology", "2x2,0x4"], "--topology", "0x4"),
            (["compare", "--trace", t, "-o", out, "--hardware", "bogus"], "--hardware", "bogus"),
            # demo
            (["demo", "-o", out, "--tokens", 0], "--tokens", "'0'"),
            (["demo", "-o", out, "--seed", -1], "--seed", "'-1'"),
            (["demo", "-o", out, "--threads", -1], "--threads", "'-1'"),
            (["demo", "-o", out, "--preset", "bogus"], "--preset", "bogus"),
            (["demo", "-o", out, "--dataset", "bogus"], "--dataset", "bogus"),
            (["demo", "-o", out, "--other-dataset", "bogus"], "--other-dataset", "bogus"),
            (["demo", "-o", out, "--topology", ","], "--topology"),
            (["demo", "-o", out, "--hardware", "bogus"], "--hardware", "bogus"),
            # export
            (["export", self.plan, "--format", "bogus", "-o", out], "--format", "bogus"),
            (["export", self.plan, "--format", "eplb", "-o", out + ".json", "--layer-offset", -1], "--layer-offset",
             "'-1'"),
            # import-stats
            (["import-stats", "--coactivation", self.path("stats/affinity.npy"), "--top-k", 0, "-o", out], "--top-k",
             "'0'"),
        ]
        for args, *needles in cases:
            with self.subTest(args=" ".join(map(str, args))):
                self.assert_error(args, *needles)
        # A rejected option leaves nothing behind (the checks run before any output is made).
        self.assertFalse(os.path.exists(out))
        self.assertFalse(os.path.exists(out + ".npy"))

    def test_largest_seed_is_accepted(self):
        p = run("gen", "--tokens", 10, "--seed", 2**64 - 1, "-o", self.path("maxseed.npy"))
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_session4_option_ranges(self):
        """The options of mixed/windowed profiling, robust and priced planning, batched, workload, adaptive and
        plan-switch evaluation and gen --shift: bad values name the option and the value; parse-time ones exit 2."""
        t, out, k2, l3 = self.trace, self.path("out"), self.path("k2.npy"), self.path("l3.npy")
        b = self.path("t2.npy")
        if not os.path.exists(b):
            p = run("gen", "--preset", "olmoe", "--tokens", 200, "--layers", 2, "--seed", 7, "-o", b)
            self.assertEqual(p.returncode, 0, p.stderr)
        plan11 = self.path("p11.json")  # grace run --backend local runs one rank
        if not os.path.exists(plan11):
            p = run("plan", "--trace", t, "--topology", "1x1", "-q", "-o", plan11)
            self.assertEqual(p.returncode, 0, p.stderr)
        for report in (self.path("rep.json"), self.path("rep.csv")):  # other tests' successful evals
            if os.path.exists(report):
                os.remove(report)
        max64 = str(2**63 - 1)
        parse_errors = [
            (["profile", t, b, "-o", out, "--mix", "1,nan"], "--mix", "'nan'"),
            (["profile", t, b, "-o", out, "--mix", "1,-1"], "--mix", "'-1'"),
            (["profile", t, b, "-o", out, "--mix", "1,"], "--mix", "weight 2"),
            (["profile", t, b, "-o", out, "--mix", "0,1"], "--mix", "'0'"),
            (["profile", t, b, "-o", out, "--mix", "1,1e309"], "--mix", "'1e309'"),
            (["profile", t, "-o", out, "--window-tokens", -1], "--window-tokens", "'-1'"),
            (["profile", t, "-o", out, "--window-tokens", 2**63], "--window-tokens", str(2**63)),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--robust", 0], "--robust", "'0'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--robust", "nan"], "--robust", "'nan'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--robust", "1.5"], "--robust", "'1.5'"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--method", "priced+"], "--method", "priced+"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--method", "grace-paper+dynamic"], "--method"),
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--priced-moves", -2], "--priced-moves", "'-2'"),
            # An integer too large for the option's type says so (it once said only "must be >= -1").
            (["plan", "--trace", t, "--topology", "2x2", "-o", out, "--priced-moves", max64], "--priced-moves",
             "at most 2147483647", max64),
            (self.eval_args("--batch-tokens", 0), "--batch-tokens", "'0'"),
            (self.eval_args("--batch-tokens", 2**63), "--batch-tokens", str(2**63)),
            (self.eval_args("--workload", "0x1+1"), "--workload", "0x1+1"),
            (self.eval_args("--workload", "4x4+"), "--workload", "4x4+"),
            (self.eval_args("--workload", max64 + "x2+1"), "--workload", "64 bits"),
            (self.eval_args("--adapt", 0), "--adapt", "'0'"),
            (self.eval_args("--adapt", 2**31), "--adapt", "at most 2147483647", str(2**31)),
            (self.eval_args("--adapt", 1, "--adapt-batch-tokens", 0), "--adapt-batch-tokens", "'0'"),
            # --adapt-decay is checked at parse time (exit 2), as the other ranges are.
            (self.eval_args("--adapt", 1, "--adapt-decay", 1), "--adapt-decay", "'1'"),
            (self.eval_args("--adapt", 1, "--adapt-decay", "nan"), "--adapt-decay", "'nan'"),
            (self.eval_args("--adapt", 1, "--adapt-decay", -0.1), "--adapt-decay", "'-0.1'"),
            (self.eval_args("--switch-plan", self.plan, "--switch-at", 0), "--switch-at", "'0'"),
            (self.eval_args("--switch-plan", self.plan, "--switch-at", 9, "--weight-bytes", 9), "--weight-bytes"),
            (["gen", "--shift", "nan", "-o", out + ".npy"], "--shift", "'nan'"),
            (["gen", "--shift", "1.1", "-o", out + ".npy"], "--shift", "'1.1'"),
            (["run", "--backend", "local", "--plan", plan11, "--trace", t, "-o", out + ".json", "--adapt", 1,
              "--adapt-decay", 1], "--adapt-decay", "'1'"),
        ]
        for args, *needles in parse_errors:
            with self.subTest(args=" ".join(map(str, args))):
                self.assert_error(args, *needles)
                self.assertEqual(run(*args).returncode, 2)
        input_errors = [
            (["profile", t, k2, "-o", out], "k2.npy has E=8"),
            (["profile", t, l3, "-o", out, "--mix", "1,1"], "l3.npy has L=3"),
            (["profile", t, b, "-o", out, "--mix", "1"], "1 weights for 2 traces"),
            (["profile", t, self.path("stats"), "-o", out], "folder"),
            # The same trace twice (also by another path) would count twice in the mix.
            (["profile", t, b, t, "-o", out], "same file", "once"),
            (["profile", t, os.path.join(self.d, ".", "t.npy"), "-o", out, "--mix", "1,1"], "same file"),
            (["plan", "--stats", self.path("stats"), "--topology", "2x2", "-o", out, "--robust", 0.9],
             "--window-tokens"),
            (self.eval_args("--workload", "100x100+1"), "workload 100x100+1", "300"),
            (self.eval_args("--adapt-decay", 0.5), "--adapt-decay", "--adapt N"),
            (self.eval_args("--adapt", 1, "--batch-tokens", 8), "--batch-tokens"),
            (self.eval_args("--adapt", 1, "--routing", "primary"), "wrr or tar"),
            (self.eval_args("--switch-plan", self.plan, "--switch-at", 300), "--switch-at 300", "[1, 300)"),
            (self.eval_args("--switch-plan", self.plan, "--switch-at", max64), "--switch-at " + max64),
            (self.eval_args("--switch-plan", self.plan), "--switch-at"),
            (self.eval_args("--switch-at", 5), "--switch-plan"),
            (self.eval_args("--switch-plan", self.path("stats"), "--switch-at", 5), "stats"),
            # --weight-bytes prices a switch; alone it was silently ignored.
            (self.eval_args("--weight-bytes", 2), "--weight-bytes 2", "--switch-plan"),
            (["run", "--backend", "local", "--plan", plan11, "--trace", t, "-o", out + ".json", "--adapt-decay",
              0.5], "--adapt-decay 0.5", "--adapt N"),
        ]
        for args, *needles in input_errors:
            with self.subTest(args=" ".join(map(str, args))):
                self.assert_error(args, *needles)
        for leftover in (out, out + ".npy", out + ".json", self.path("rep.json"), self.path("rep.csv")):
            self.assertFalse(os.path.exists(leftover), leftover)

    def test_run_batch_tokens_near_int64_max_is_one_step(self):
        # grace run --batch-tokens 2^63-1: one call with every token (the step count overflowed to 0 and the run
        # silently did nothing), as with the default.
        plan11 = self.path("p11.json")
        if not os.path.exists(plan11):
            p = run("plan", "--trace", self.trace, "--topology", "1x1", "-q", "-o", plan11)
            self.assertEqual(p.returncode, 0, p.stderr)
        reports = []
        for extra in ([], ["--batch-tokens", 2**63 - 1]):
            out = self.path("run-huge.json")
            p = run("run", "--backend", "local", "--plan", plan11, "--trace", self.trace, "--hidden", 16,
                    "--intermediate", 8, "--verify", "-o", out, *extra)
            self.assertEqual(p.returncode, 0, p.stderr)
            with open(out) as f:
                reports.append(json.load(f))
            os.remove(out)
        self.assertEqual(reports[1]["steps_per_layer"], 1)
        self.assertEqual(reports[1]["steps_per_layer"], reports[0]["steps_per_layer"])
        self.assertEqual(reports[1]["num_tokens"], 300)

    def test_switch_plan_bad_id_names_the_trace_token(self):
        # A bad id after --switch-at is named by its token in the trace (it was named from the switch point on:
        # token 299 read as 199 with --switch-at 100).
        ids = np.load(self.trace)
        ids[299, 1, 0] = 64
        bad = self.path("bad-late.npy")
        np.save(bad, ids)
        with open(self.path("t.json")) as f:
            meta = json.load(f)
        meta.pop("weights", None)
        with open(self.path("bad-late.json"), "w") as f:
            json.dump(meta, f)
        for report in (self.path("rep.json"), self.path("rep.csv")):
            if os.path.exists(report):
                os.remove(report)
        self.assert_error(self.eval_args("--switch-plan", self.plan, "--switch-at", 100, trace=bad),
                          "expert id 64 at token 299, layer 1")
        self.assertFalse(os.path.exists(self.path("rep.json")))

    # --- gate weights --------------------------------------------------------------------------------------------

    def weights_commands(self, weights):
        """Every command that reads the trace, each with --weights."""
        t = self.trace
        return [
            ["profile", t, "-q", "-o", self.path("w_stats"), "--weights", weights],
            ["plan", "--trace", t, "--topology", "2x2", "-q", "-o", self.path("w_plan.json"), "--weights", weights],
            self.eval_args("--weights", weights),
            ["compare", "--trace", t, "--topology", "2x2", "-o", self.path("w_cmp"), "--weights", weights],
        ]

    def test_weights_missing_nan_negative_misshaped(self):
        w = self.weights
        nan = w.copy()
        nan[250, 1, 3] = np.nan
        neg = w.copy()
        neg[7, 0, 2] = -0.25
        inf = w.copy()
        inf[0, 0, 0] = np.inf
        cases = [
            (self.path("missing.weights.npy"), ["missing.weights.npy", "no such file"]),
            (self.save_weights("nan.npy", nan), ["nan.npy", "token 250, layer 1, rank 3", "not finite"]),
            (self.save_weights("inf.npy", inf), ["inf.npy", "token 0, layer 0, rank 0", "not finite"]),
            (self.save_weights("neg.npy", neg), ["neg.npy", "-0.25", "token 7, layer 0, rank 2", "negative"]),
            (self.save_weights("short.npy", w[:100]), ["short.npy", "[100, 2, 8]", "[300, 2, 8]"]),
            (self.save_weights("k7.npy", w[..., :7]), ["k7.npy", "[300, 2, 7]"]),
            (self.save_weights("int.npy", np.zeros(w.shape, np.int32)), ["int.npy", "floats", "int32"]),
        ]
        for weights, needles in cases:
            for args in self.weights_commands(weights):
                with self.subTest(weights=os.path.basename(weights), command=args[0]):
                    self.assert_error(args, *needles)
        # plan --stats --trace reads only the trace's header: the weights' header is still checked.
        self.assert_error(["plan", "--stats", self.path("stats"), "--trace", self.trace, "--topology", "2x2", "-o",
                           self.path("w_plan.json"), "--weights", self.path("short.npy")], "short.npy", "[100, 2, 8]")

    def test_bad_weight_found_in_a_late_chunk(self):
        nan = self.weights.copy()
        nan[299, 1, 7] = np.nan
        weights = self.save_weights("late.npy", nan)
        self.assert_error(["profile", self.trace, "-q", "--chunk", 64, "-o", self.path("late"), "--weights", weights],
                          "token 299, layer 1, rank 7")
        self.assertFalse(os.path.exists(self.path("late")))

    def test_metadata_weights_are_read(self):
        # A trace whose metadata names a weights file that is gone, or holds NaN, fails every reader.
        ids = np.load(self.trace)
        with open(self.path("t.json")) as f:
            meta = json.load(f)
        for name, weights in [("gone", None), ("nanmeta", self.weights.copy())]:
            np.save(self.path(f"{name}.npy"), ids)
            meta["weights"] = f"{name}.weights.npy"
            with open(self.path(f"{name}.json"), "w") as f:
                json.dump(meta, f)
            if weights is not None:
                weights[3, 0, 0] = np.nan
                np.save(self.path(f"{name}.weights.npy"), weights)
            needle = "no such file" if weights is None else "not finite"
            t = self.path(f"{name}.npy")
            for args in (["profile", t, "-q", "-o", self.path(f"{name}_stats")],
                         ["plan", "--trace", t, "--topology", "2x2", "-q", "-o", self.path(f"{name}_plan.json")],
                         self.eval_args(trace=t),
                         ["compare", "--trace", t, "--topology", "2x2", "-o", self.path(f"{name}_cmp")]):
                with self.subTest(trace=name, command=args[0]):
                    self.assert_error(args, f"{name}.weights.npy", needle)

    def test_good_weights_any_float_dtype_pass(self):
        for dtype in (np.float16, np.float32, np.float64):
            weights = self.save_weights(f"ok_{np.dtype(dtype).name}.npy", self.weights.astype(dtype))
            for args in self.weights_commands(weights):
                with self.subTest(dtype=np.dtype(dtype).name, command=args[0]):
                    p = run(*args)
                    self.assertEqual(p.returncode, 0, p.stderr)

    def test_compare_weights_belong_to_the_evaluation_trace(self):
        # --weights is shaped like --trace; a --profile-trace of another length keeps its own weights.
        other = self.path("other.npy")
        self.assertEqual(run("gen", "--preset", "olmoe", "--tokens", 120, "--layers", 2, "--dataset", "c4", "-o",
                             other).returncode, 0)
        weights = self.save_weights("eval_w.npy", self.weights)
        p = run("compare", "--trace", self.trace, "--profile-trace", other, "--topology", "2x2", "-o",
                self.path("cmp_cross"), "--weights", weights)
        self.assertEqual(p.returncode, 0, p.stderr)

    # --- plan against trace --------------------------------------------------------------------------------------

    def test_plan_must_match_the_trace(self):
        k2 = self.path("k2_plan.json")
        self.assertEqual(run("plan", "--trace", self.path("k2.npy"), "--experts", 64, "--topology", "2x2", "-q", "-o",
                             k2).returncode, 0)
        self.assert_error(self.eval_args(plan=k2), "top_k = 2", "top_k = 8")
        self.assert_error(self.eval_args(trace=self.path("l3.npy")), "2 layers", "has 3")
        self.assert_error(self.eval_args("--experts", 80), "64 experts", "has 80")
        # plan --stats S --trace T: T must match the statistics in E, L and k.
        self.assert_error(["plan", "--stats", self.path("stats"), "--trace", self.path("k2.npy"), "--experts", 64,
                           "--topology", "2x2", "-o", self.path("k_plan.json")], "k=8", "k=2")
        # compare: the profile trace must match the evaluation trace in E, L and k.
        self.assert_error(["compare", "--trace", self.trace, "--profile-trace", self.path("k2.npy"), "--experts", 64,
                           "--topology", "2x2", "-o", self.path("cmp_k")], "top_k = 2", "and 8")
        self.assert_error(["compare", "--trace", self.trace, "--profile-trace", self.path("l3.npy"), "--topology",
                           "2x2", "-o", self.path("cmp_l")], "3 layers", ", 2 and")

    # --- messages ------------------------------------------------------------------------------------------------

    def test_folder_and_missing_file_messages(self):
        for args in (["profile", self.d, "-o", self.path("f_stats")], self.eval_args(trace=self.d),
                     ["compare", "--trace", self.d, "-o", self.path("f_cmp")]):
            with self.subTest(command=args[0]):
                line = self.assert_error(args, self.d, "is a folder")
                self.assertNotIn("magic", line)
        missing = self.path("nope.npy")
        for args in (["profile", missing, "-o", self.path("m_stats")], self.eval_args(trace=missing)):
            with self.subTest(command=args[0]):
                self.assert_error(args, missing, "no such file")

    def test_shape_hints_name_only_real_options(self):
        # compare has no --hidden/--intermediate: its hint must not suggest them; eval's does.
        line = self.assert_error(["compare", "--trace", self.trace, "--model", "unknown-model", "--topology", "2x2",
                                  "-o", self.path("hint")], "unknown-model", "hardware file")
        self.assertNotIn("--hidden", line)
        self.assert_error(self.eval_args("--model", "unknown-model"), "unknown-model", "--hidden and --intermediate")
        # With both sizes given, an unknown model is fine.
        p = run(*self.eval_args("--model", "unknown-model", "--hidden", 1024, "--intermediate", 512))
        self.assertEqual(p.returncode, 0, p.stderr)


if __name__ == "__main__":
    unittest.main()
