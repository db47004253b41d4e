"""pip build of the `grace` Python package: the pure-Python package in python/grace plus the compiled core
(grace._grace and any other extension module the CMake build writes beside it), built by the project's own CMake.

    python3 -m pip install --no-build-isolation .      # or: python3 -m pip wheel --no-build-isolation .

No scikit-build (not packaged in Debian 12): build_ext runs `cmake` + `cmake --build --target _grace` itself.
Environment:
    GRACE_USE_CUDA=1            build the CUDA + NCCL backend too (GRACE_CUDA_ARCHITECTURES, default 90)
    CMAKE_ARGS="-Dx=y ..."      extra configure arguments (e.g. -Dpybind11_DIR=..., a compiler launcher)
    CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all cores)
    GRACE_CMAKE_BUILD_DIR=DIR   developers only: reuse an already configured CMake build folder (one configured
                                with -DGRACE_BUILD_PYTHON=ON for this same Python) instead of configuring a fresh
                                one; only `cmake --build DIR --target _grace` runs there.
The default is a real build in build-pip/ (setuptools' build folder, kept out of the developers' build/).
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
os.makedirs(os.path.join(ROOT, "build-pip"), exist_ok=True)  # egg_base below must exist


def project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        m = re.search(r"project\(\s*grace\s+VERSION\s+([0-9.]+)", f.read())
    if not m:
        raise RuntimeError("CMakeLists.txt: no `project(grace VERSION x.y.z)` to take the package version from")
    return m.group(1)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")


class CMakeExtension(Extension):
    """An extension built by CMake: no sources for setuptools to compile."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        reuse = os.environ.get("GRACE_CMAKE_BUILD_DIR", "").strip()
        if reuse:
            build_dir = os.path.abspath(reuse)
            if not os.path.isfile(os.path.join(build_dir, "CMakeCache.txt")):
                raise RuntimeError(f"GRACE_CMAKE_BUILD_DIR={reuse}: no CMakeCache.txt there (configure it first: "
                                   "cmake -S . -B DIR -DGRACE_BUILD_PYTHON=ON)")
        else:
            build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
            self.configure(build_dir)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        self.run_cmd(["cmake", "--build", build_dir, "--target", "_grace", "-j", jobs])

        # Every extension module the build placed in python/grace (the core, and e.g. a CUDA binding module).
        built = sorted(glob.glob(os.path.join(build_dir, "python", "grace", "*" + suffix)))
        if not any(os.path.basename(p) == "_grace" + suffix for p in built):
            found = [os.path.basename(p) for p in glob.glob(os.path.join(build_dir, "python", "grace", "*.so"))]
            raise RuntimeError(f"{build_dir}/python/grace has no _grace{suffix} (found {found or 'nothing'}): the "
                               f"build is for another Python than {sys.executable}, or was configured without "
                               "-DGRACE_BUILD_PYTHON=ON")
        dest = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(dest, exist_ok=True)
        for path in built:
            shutil.copy2(path, os.path.join(dest, os.path.basename(path)))

    def configure(self, build_dir):
        os.makedirs(build_dir, exist_ok=True)
        args = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGRACE_BUILD_PYTHON=ON",
                "-DGRACE_BUILD_TESTS=OFF", "-DGRACE_BUILD_BENCH=OFF", "-DGRACE_USE_MPI=OFF",
                f"-DPython3_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja") and not os.path.isfile(os.path.join(build_dir, "Makefile")):
            args += ["-G", "Ninja"]
        if env_flag("GRACE_USE_CUDA"):
            arch = os.environ.get("GRACE_CUDA_ARCHITECTURES", "90")
            args += ["-DGRACE_USE_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
        else:
            args += ["-DGRACE_USE_CUDA=OFF"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        self.run_cmd(args)
        with open(os.path.join(build_dir, "CMakeCache.txt"), encoding="utf-8") as f:
            cache = f.read()
        if re.search(r"^pybind11_DIR:[A-Z]+=.*NOTFOUND", cache, re.M):
            raise RuntimeError("CMake did not find pybind11: install Debian's pybind11-dev, or pass its CMake folder "
                               "with CMAKE_ARGS=-Dpybind11_DIR=...")

    @staticmethod
    def run_cmd(args):
        print("+ " + " ".join(shlex.quote(a) for a in args), flush=True)
        subprocess.run(args, check=True)


setup(
    version=project_version(),
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("grace._grace")],
    cmdclass={"build_ext": CMakeBuild},
    # setuptools' build folder is build-pip/, so that an in-tree pip build never writes into a developer's build/.
    options={"build": {"build_base": "build-pip"}, "egg_info": {"egg_base": "build-pip"}},
    zip_safe=False,
)
