#!/usr/bin/python3
"""Integers from the command line and input files are range-checked, not wrapped (issue #15, defects 4, 5, 7).

Each case runs `grace` on an input holding one out-of-range number and expects exit status 1, one line
`grace: error: ...` naming the value and the field or option, and no output file.
"""
import json
import os
import resource
import subprocess
import tempfile
import unittest

import numpy as np

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
BUILD = os.environ.get("GRACE_BUILD_DIR", "build")


def run(args, env=None, limit_bytes=None):
    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run([GRACE] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})), preexec_fn=cap_memory if limit_bytes else None)


def write_trace(path, T=64, L=2, k=2, E=8, meta=None):
    rng = np.random.default_rng(5)
    ids = np.stack([np.stack([rng.choice(E, size=k, replace=False) for _ in range(L)]) for _ in range(T)])
    np.save(path, ids.astype(np.int32))
    base = {"format": "grace.trace/v1", "num_experts": E, "num_layers": L, "top_k": k, "num_tokens": T}
    base.update(meta or {})
    with open(path[:-4] + ".json", "w") as f:
        json.dump(base, f)


def sanitized_build():
    try:
        with open(os.path.join(BUILD, "CMakeCache.txt")) as f:
            return "GRACE_SANITIZE:BOOL=ON" in f.read()
    except OSError:
        return False


class Limits(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def expect_error(self, args, *parts, env=None, output=None):
        r = run(args, env=env)
        # 1: rejected while running; 2: rejected while parsing the command line (option value checks)
        self.assertIn(r.returncode, (1, 2), r.stderr)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("grace: error: "), r.stderr)
        for part in parts:
            self.assertIn(part, lines[0])
        if output:
            self.assertFalse(os.path.exists(output), f"{output} was written")
        return lines[0]

    def make_plan(self, extra=()):
        write_trace(self.path("t.npy"), E=8)
        self.assertEqual(run(["profile", self.path("t.npy"), "-o", self.path("st"), "-q"]).returncode, 0)
        r = run(["plan", "--stats", self.path("st"), "--topology", "1x4", "-o", self.path("p.json")] + list(extra))
        self.assertEqual(r.returncode, 0, r.stderr)
        return self.path("p.json")

    def test_plan_integer_that_would_wrap(self):
        plan = self.make_plan()
        with open(plan) as f:
            j = json.load(f)
        j["num_experts"] = 2**32 + 16  # get<int>() read this as 16
        with open(self.path("bad.json"), "w") as f:
            json.dump(j, f)
        self.expect_error(["export", self.path("bad.json"), "--format", "sglang", "-o", self.path("out.json")],
                          "plan: num_experts: 4294967312 is outside [1, 2147483647]", output=self.path("out.json"))
        j["num_experts"] = 8
        j["layers"][0]["routing"]["weights"][0][0] = 2**31 - 1
        with open(self.path("bad.json"), "w") as f:
            json.dump(j, f)
        self.expect_error(["export", self.path("bad.json"), "--format", "sglang", "-o", self.path("out.json")],
                          "layers[0].routing.weights[0][0]: 2147483647 is outside [1, 65535]")

    def test_topology_and_slots(self):
        self.make_plan()
        self.expect_error(["plan", "--stats", self.path("st"), "--topology", "65536x65536", "-o", self.path("q.json")],
                          "65536x65536 has 4294967296 GPUs, more than the 65536", output=self.path("q.json"))
        self.expect_error(["plan", "--stats", self.path("st"), "--topology", "1x4", "--slots-per-gpu", "2147483647",
                           "--method", "eplb", "-o", self.path("q.json")],
                          "--slots-per-gpu", "2147483647 exceeds the 8 experts", output=self.path("q.json"))

    def test_export_layer_offset_is_bounded(self):
        plan = self.make_plan()
        # Used to write 2^31-1 rows, without end.
        self.expect_error(["export", plan, "--format", "sglang", "--layer-offset", "2147483647", "-o",
                           self.path("s.json")], "layer offset 2147483647 is outside [0, 10000]",
                          output=self.path("s.json"))

    def test_profile_estimates_memory_before_allocating(self):
        write_trace(self.path("t.npy"), L=48, E=8)
        line = self.expect_error(["profile", self.path("t.npy"), "-o", self.path("st"), "--experts", "100000"],
                                 "100000 experts (--experts) over 48 layers", "TiB",
                                 "(limit: 16.0 GiB, GRACE_MEMORY_LIMIT)", env={"GRACE_MEMORY_LIMIT": "16G"},
                                 output=self.path("st"))
        self.assertIn("needs", line)

    def test_trace_metadata_that_contradicts_the_array(self):
        write_trace(self.path("t.npy"), T=64, L=2, k=2, meta={"top_k": 4})
        self.expect_error(["profile", self.path("t.npy"), "-o", self.path("st")], "top_k = 4 contradicts",
                          "of shape [64, 2, 2]", output=self.path("st"))
        write_trace(self.path("t.npy"), meta={"num_experts": 16.7})
        self.expect_error(["profile", self.path("t.npy"), "-o", self.path("st")],
                          "num_experts: 16.7 is not an integer", output=self.path("st"))

    @unittest.skipIf(sanitized_build(), "AddressSanitizer cannot run under an address-space limit")
    def test_out_of_memory_is_one_line(self):
        # The estimate allows 1 TiB, the process may map 2 GiB: the allocation itself fails, and main turns
        # std::bad_alloc into one line.
        write_trace(self.path("t.npy"), L=1, E=8)
        r = run(["profile", self.path("t.npy"), "-o", self.path("st"), "--experts", "40000", "--threads", "1"],
                env={"GRACE_MEMORY_LIMIT": "1T"}, limit_bytes=2 << 30)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("grace: error: out of memory", r.stderr)
        self.assertFalse(os.path.exists(self.path("st")))


if __name__ == "__main__":
    unittest.main()
