#!/usr/bin/env python3
"""`grace` without the heavy runtime: it links neither MPI nor the CUDA libraries, and `grace run` hands its
arguments, untouched, to the `grace-run` executable beside it (with a one-line error where that is missing)."""
import os
import shutil
import subprocess
import tempfile
import unittest

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
GRACE_RUN = os.path.join(os.path.dirname(GRACE), "grace-run")
HEAVY_LIBRARIES = ["libmpi", "libcuda", "libcudart", "libcublas", "libnccl", "libopen-pal", "libopen-rte"]


def run(binary, *args):
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=120)


def linked_libraries(binary):
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


class Launcher(unittest.TestCase):
    def test_grace_links_no_mpi_or_gpu_library(self):
        libs = linked_libraries(GRACE)
        for heavy in HEAVY_LIBRARIES:
            self.assertFalse([lib for lib in libs if lib.startswith(heavy)], f"grace links {heavy}: {libs}")

    def test_version_and_help_list_run(self):
        r = run(GRACE, "--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("grace 0.1.0", r.stdout)
        r = run(GRACE, "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("run", r.stdout.split())
        self.assertIn("Replay a trace through a plan on the real MoE layer", r.stdout)

    def test_every_command_has_its_options(self):
        # main builds the options of the named command only: each must still parse and print its own.
        listing = run(GRACE, "--help").stdout.split("Subcommands:")[1]
        names = [line.split()[0] for line in listing.splitlines() if line.strip()]
        self.assertIn("plan", names)
        for name in names:
            r = run(GRACE, name, "--help")
            self.assertEqual(r.returncode, 0, f"{name}: {r.stderr}")
            self.assertIn(f" {name} [OPTIONS]", r.stdout)
            options = [line for line in r.stdout.splitlines() if line.strip().startswith("-")]
            self.assertGreater(len(options), 1, f"{name} --help lists no options of its own:\n{r.stdout}")
        r = run(GRACE, "plan")
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stderr, "grace: error: --topology is required\n")

    def test_run_help_comes_from_grace_run(self):
        r = run(GRACE, "run", "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        for option in ["--plan", "--trace", "--backend", "--verify", "--output"]:
            self.assertIn(option, r.stdout)
        self.assertEqual(r.stdout, run(GRACE_RUN, "run", "--help").stdout.replace("grace-run", "grace"))

    def test_run_arguments_pass_through_in_every_form(self):
        with tempfile.TemporaryDirectory() as tmp:
            missing = os.path.join(tmp, "no-such-plan.json")
            out = os.path.join(tmp, "report.json")
            for args in (["--plan", missing], [f"--plan={missing}"]):
                r = run(GRACE, "run", *args, "--trace", os.path.join(tmp, "t.npy"), "-o", out)
                self.assertNotEqual(r.returncode, 0)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertTrue(r.stderr.startswith("grace: error:"), r.stderr)
                self.assertIn("no-such-plan.json", r.stderr)
                self.assertFalse(os.path.exists(out))
            # An option grace-run does not know is reported by grace-run's parser, exit code 2 as before.
            r = run(GRACE, "run", "--plan", missing, "--trace", "t.npy", "-o", out, "--no-such-option")
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("--no-such-option", r.stderr)

    def test_missing_grace_run_is_a_one_line_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            lonely = os.path.join(tmp, "grace")
            shutil.copy(GRACE, lonely)
            r = run(lonely, "run", "--plan", "p.json", "--trace", "t.npy", "-o", "out.json")
            self.assertEqual(r.returncode, 1)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertTrue(r.stderr.startswith("grace: error: grace run needs the executable"), r.stderr)
            self.assertIn(os.path.join(tmp, "grace-run"), r.stderr)
            # the other commands do not need it
            self.assertEqual(run(lonely, "--version").returncode, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
