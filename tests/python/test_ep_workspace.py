"""The share_workspace and check_ids options of grace.ep.Buffer and grace.hf.patch, without a GPU: each value is
checked (a bool, else a one-line GraceError naming it), the CUDA backend is built with both (the CPU backend, which
has no device scratch and checks ids at no cost, with neither); grace.hf.patch passes check_ids=False (its ids are the
router's top-k) unless told otherwise; grace.ep._cuda.shared_workspace hands out one workspace per (CUDA device, host communicator),
and grace.hf.patch passes share_workspace=True to its buffers by default. The GPU side (bit-identical outputs, the
refusal of a second layer while a handle is open) is tests/cuda/gpu_moe_layer_test.cpp (GpuWorkspace.*). Skips when
the module was not built or torch is missing."""

import os
import sys
import types
import unittest

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
MODULE_DIR = os.path.join(BUILD, "python")
HERE = os.path.dirname(os.path.abspath(__file__))

if not os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    print(f"SKIP: {MODULE_DIR}/grace not built (configure with -DGRACE_BUILD_PYTHON=ON)")
    sys.exit(0)
try:
    import torch
    import torch.distributed as dist
except ImportError as e:
    print(f"SKIP: torch is not importable ({e})")
    sys.exit(0)
if not (dist.is_available() and dist.is_gloo_available()):
    print("SKIP: torch.distributed with gloo is not available")
    sys.exit(0)
sys.path.insert(0, MODULE_DIR)
import grace  # noqa: E402

if grace._EXT_ERROR is not None:
    raise SystemExit(f"grace._grace does not import: {grace._EXT_ERROR}")
import grace.ep as ep  # noqa: E402
from grace._grace import _ep  # noqa: E402

E = 8


def plan_1x1():
    """Every expert on the one GPU."""
    return {"format": "grace.plan/v1", "num_experts": E, "num_layers": 1, "top_k": 2,
            "topology": {"nodes": 1, "gpus_per_node": 1, "slots_per_gpu": None}, "method": "test", "seed": 0,
            "source": "test_ep_workspace.py",
            "layers": [{"layer": 0, "gpu_experts": [list(range(E))], "primary_gpu": [0] * E}]}


class FakeBackends:
    """A backend module whose CpuBackend / CudaBackend record the keyword arguments they were built with."""

    def __init__(self):
        self.calls = []
        rec = self.calls

        class Backend:
            def __init__(self, plan, layer, topology, **kwargs):
                rec.append((type(self).__name__, kwargs))

        self.CpuBackend = type("CpuBackend", (Backend,), {})
        self.CudaBackend = type("CudaBackend", (Backend,), {})


class BufferOption(unittest.TestCase):
    def setUp(self):
        self.saved = ep._backend_module
        self.fake = FakeBackends()
        ep._backend_module = lambda device: self.fake

    def tearDown(self):
        ep._backend_module = self.saved

    def test_default_is_shared_and_reaches_the_cuda_backend(self):
        buf = ep.Buffer(None, plan_1x1(), 0)
        self.assertIs(buf.share_workspace, True)
        buf._backend_for(torch.device("cuda", 0))  # a device object only: nothing runs on a GPU
        self.assertEqual(self.fake.calls[-1][0], "CudaBackend")
        self.assertIs(self.fake.calls[-1][1]["share_workspace"], True)

    def test_false_reaches_the_cuda_backend(self):
        buf = ep.Buffer(None, plan_1x1(), 0, share_workspace=False)
        buf._backend_for(torch.device("cuda", 0))
        self.assertIs(self.fake.calls[-1][1]["share_workspace"], False)

    def test_cpu_backend_is_built_without_it(self):
        buf = ep.Buffer(None, plan_1x1(), 0, share_workspace=False)
        buf._backend_for(torch.device("cpu"))
        self.assertEqual(self.fake.calls[-1][0], "CpuBackend")
        self.assertNotIn("share_workspace", self.fake.calls[-1][1])

    def test_check_ids_reaches_the_cuda_backend_only(self):
        for given, expected in ((None, True), (True, True), (False, False)):
            extra = {} if given is None else {"check_ids": given}
            buf = ep.Buffer(None, plan_1x1(), 0, **extra)
            self.assertIs(buf.check_ids, expected)
            buf._backend_for(torch.device("cuda", 0))
            self.assertIs(self.fake.calls[-1][1]["check_ids"], expected)
        buf = ep.Buffer(None, plan_1x1(), 0, check_ids=False)
        buf._backend_for(torch.device("cpu"))
        self.assertNotIn("check_ids", self.fake.calls[-1][1])
        for bad in (0, "no", None):
            with self.assertRaises(ValueError) as cm:
                ep.Buffer(None, plan_1x1(), 0, check_ids=bad)
            self.assertIsInstance(cm.exception, grace.GraceError)
            self.assertEqual(str(cm.exception), f"check_ids must be True or False, got {bad!r}")

    def test_non_bool_is_refused(self):
        for bad in (1, "yes", None):
            with self.assertRaises(ValueError) as cm:
                ep.Buffer(None, plan_1x1(), 0, share_workspace=bad)
            self.assertIsInstance(cm.exception, grace.GraceError)
            self.assertEqual(str(cm.exception), f"share_workspace must be True or False, got {bad!r}")


class SharedWorkspaces(unittest.TestCase):
    """grace.ep._cuda.shared_workspace: one workspace per (device index, host communicator object)."""

    def setUp(self):
        from grace.ep import _cuda
        self.cuda = _cuda
        self.saved_ep, self.saved = _cuda._ep, dict(_cuda._WORKSPACES)
        _cuda._WORKSPACES.clear()

    def tearDown(self):
        self.cuda._ep = self.saved_ep
        self.cuda._WORKSPACES.clear()
        self.cuda._WORKSPACES.update(self.saved)

    def check(self):
        self.host_a = host_a = object()
        host_b = object()
        w = self.cuda.shared_workspace(0, host_a)
        self.assertIs(self.cuda.shared_workspace(0, host_a), w)
        self.assertIsNot(self.cuda.shared_workspace(1, host_a), w)
        self.assertIsNot(self.cuda.shared_workspace(0, host_b), w)
        self.assertIsNot(self.cuda.shared_workspace(0, None), w)
        self.assertIs(self.cuda.shared_workspace(0, None), self.cuda.shared_workspace(0, None))
        return w

    def test_keyed_by_device_and_group(self):
        made = [0]  # a count, not the objects: the registry must be free to let them go

        class Workspace:
            def __init__(self):
                made[0] += 1

        self.cuda._ep = types.SimpleNamespace(GpuWorkspace=Workspace)
        w = self.check()
        # (0, a) is held by w; (1, a), (0, b) and the first (0, None) were dropped at once; the last pair of (0, None)
        # calls shared one.
        self.assertEqual(made[0], 5)
        self.assertIs(self.cuda.shared_workspace(0, "a"), self.cuda.shared_workspace(0, "a"))
        self.assertIs(self.cuda.shared_workspace(0, self.host_a), w)

    def test_freed_with_its_last_holder(self):
        import gc
        import weakref

        class Workspace:
            pass

        self.cuda._ep = types.SimpleNamespace(GpuWorkspace=Workspace)
        host = object()
        w = self.cuda.shared_workspace(0, host)
        gone = weakref.ref(w)
        self.assertIs(self.cuda.shared_workspace(0, host), w)
        del w
        gc.collect()
        self.assertIsNone(gone(), "the registry must not keep a workspace alive")
        w2 = self.cuda.shared_workspace(0, host)
        self.assertIsInstance(w2, Workspace)
        self.assertEqual(len(self.cuda._WORKSPACES), 1)

    @unittest.skipUnless(getattr(_ep, "cuda_available", False), "grace._grace built without CUDA")
    def test_real_workspace_needs_no_gpu_to_make(self):
        w = self.check()
        self.assertEqual(w.buffer_bytes, 0)
        self.assertFalse(w.in_use)


class HfPatchOption(unittest.TestCase):
    def check_passed(self, option, cases):
        """grace.hf.patch hands `option` to every block's buffer: for each (given, expected), given None = left out."""
        sys.path.insert(0, HERE)
        import test_hf_patch as hfmock
        import grace.hf as ghf

        for given, expected in cases:
            seen = []

            def factory(group, plan, layer, **kwargs):
                seen.append(kwargs.get(option, "missing"))
                return hfmock.ReferenceBuffer(group, plan, layer, **kwargs)

            model, n = hfmock.build(hfmock.FAMILIES_5["olmoe"])
            extra = {} if given is None else {option: given}
            ghf.patch(model, hfmock.identity_plan(n, hfmock.num_experts(model)), buffer_factory=factory, **extra)
            self.assertEqual(seen, [expected] * n, f"{option}={given!r}")

    def test_patch_passes_share_workspace(self):
        self.check_passed("share_workspace", ((None, True), (False, False)))

    def test_patch_passes_check_ids(self):
        self.check_passed("check_ids", ((None, False), (True, True)))


if __name__ == "__main__":
    unittest.main()
