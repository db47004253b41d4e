"""pip install of the grace package: `pip install --no-build-isolation .` and `pip wheel --no-build-isolation .`
from a copy of the source tree into a fresh venv (--system-site-packages, for Debian's NumPy), then `import grace`
from outside the source tree and a small profile + plan.

The extension build: by default the test points setup.py at the build folder ctest runs from
(GRACE_CMAKE_BUILD_DIR=$GRACE_BUILD_DIR, its _grace is already built, so only packaging and installing are timed
here); GRACE_TEST_PIP_FULL_BUILD=1 makes the first install a real from-scratch CMake build, as a user's
`pip install .` is (several minutes on 2 cores). Needs python3-venv, python3-pip and python3-setuptools; skips
without them."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

SRC = os.path.abspath(os.environ.get("GRACE_SOURCE_DIR",
                                     os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
FULL = os.environ.get("GRACE_TEST_PIP_FULL_BUILD", "") == "1"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def have_tools():
    r = subprocess.run([PY, "-c", "import setuptools, wheel, venv, pip"], capture_output=True)
    return r.returncode == 0


def ext_built(build_dir):
    return bool(glob.glob(os.path.join(build_dir, "python", "grace", "_grace*.so")))


def copy_tree(dst):
    """The source tree without build outputs, VCS data or local scratch folders."""
    def ignore(d, names):
        if os.path.abspath(d) != SRC:
            return {n for n in names if n == "__pycache__"}
        return {n for n in names if n.startswith(("build", ".")) or n == "out"}
    shutil.copytree(SRC, dst, ignore=ignore)


SNIPPET = r"""
import json, os, sys
import numpy as np
import grace, grace.engines, grace.hf, grace.recorder
rng = np.random.default_rng(0)
ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(200)]).astype(np.int32)
plan = grace.plan(grace.profile(ids, 8, topology="1x2"), "1x2")
print(json.dumps({"file": grace.__file__, "version": grace.__version__, "layers": len(plan["layers"]),
                  "gpus": [len(g) for g in plan["layers"][0]["gpu_experts"]],
                  "ep": os.path.isdir(os.path.join(os.path.dirname(grace.__file__), "ep"))}))
"""


@unittest.skipUnless(have_tools(), "python3-venv / python3-pip / python3-setuptools / python3-wheel missing")
class PipInstall(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grace-pip-")
        cls.src = os.path.join(cls.tmp, "src")
        copy_tree(cls.src)
        cls.venv = os.path.join(cls.tmp, "venv")
        subprocess.run([PY, "-m", "venv", "--system-site-packages", "--without-pip", cls.venv], check=True)
        cls.vpy = os.path.join(cls.venv, "bin", "python")
        cls.env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1",
                       CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
        cls.env.pop("PYTHONPATH", None)
        if not FULL:
            if not ext_built(BUILD):
                raise unittest.SkipTest(f"no built extension in {BUILD}/python/grace (set GRACE_BUILD_DIR, or "
                                        "GRACE_TEST_PIP_FULL_BUILD=1 for a from-scratch build)")
            cls.env["GRACE_CMAKE_BUILD_DIR"] = BUILD

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def pip(self, *args, env=None):
        t0 = time.time()
        r = subprocess.run([self.vpy, "-m", "pip", *args], capture_output=True, text=True, cwd=self.tmp,
                           env=env or self.env, timeout=1800)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-3000:])
        return time.time() - t0

    def check_import(self):
        r = subprocess.run([self.vpy, "-c", SNIPPET], capture_output=True, text=True, cwd=self.tmp, env=self.env,
                           timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertTrue(out["file"].startswith(self.venv), out["file"])  # the installed copy, not the sources
        self.assertEqual(out["layers"], 2)
        self.assertEqual(len(out["gpus"]), 2)
        self.assertEqual(out["ep"], os.path.isdir(os.path.join(SRC, "python", "grace", "ep")))
        return out

    def test_1_pip_install(self):
        took = self.pip("install", "--no-build-isolation", "--no-deps", self.src)
        print(f"pip install ({'full CMake build' if FULL else 'reusing ' + BUILD}): {took:.1f} s", file=sys.stderr)
        self.check_import()
        # nothing written into the source copy except setuptools' build-pip/ folder
        self.assertFalse(glob.glob(os.path.join(self.src, "python", "*.egg-info")))
        self.assertFalse(os.path.exists(os.path.join(self.src, "build")))

    def test_2_pip_wheel(self):
        # The second build always reuses a configured build (the one test_1 made, or ctest's).
        env = dict(self.env)
        if FULL:
            made = glob.glob(os.path.join(self.src, "build-pip", "temp.*", "cmake"))
            if made:
                env["GRACE_CMAKE_BUILD_DIR"] = made[0]
        wheels = os.path.join(self.tmp, "wheels")
        self.pip("wheel", "--no-build-isolation", "--no-deps", "-w", wheels, self.src, env=env)
        found = glob.glob(os.path.join(wheels, "grace-*.whl"))
        self.assertEqual(len(found), 1, os.listdir(wheels))
        names = zipfile.ZipFile(found[0]).namelist()
        for want in ("grace/__init__.py", "grace/hf.py", "grace/recorder.py", "grace/engines/__init__.py"):
            self.assertIn(want, names)
        self.assertTrue(any(n.startswith("grace/_grace") and n.endswith(".so") for n in names), names)
        if os.path.isdir(os.path.join(SRC, "python", "grace", "ep")):
            self.assertIn("grace/ep/__init__.py", names)
        self.pip("install", "--no-deps", "--force-reinstall", found[0])
        self.check_import()

    def test_3_reuse_of_a_missing_build_dir_is_refused(self):
        env = dict(self.env, GRACE_CMAKE_BUILD_DIR=os.path.join(self.tmp, "nothing-here"))
        r = subprocess.run([self.vpy, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                            os.path.join(self.tmp, "w2"), self.src], capture_output=True, text=True, cwd=self.tmp,
                           env=env, timeout=600)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nothing-here: no CMakeCache.txt there", r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
