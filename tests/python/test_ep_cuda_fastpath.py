#!/usr/bin/env python3
"""The per-call path of grace.ep's CUDA backend (python/grace/ep/_cuda.py, CudaBackend.moe), without a GPU: the C++
layer is replaced by a recorder, and the CUDA-only device check is relaxed to accept CPU tensors, so what runs is the
backend's own logic:

- the first call is checked in Python and registers (w13, w2) once; later calls with the same weight tensors take
  the short path (no Python checks, no re-registration) and pass int64 ids through as they are (the layer narrows
  them on the device);
- a new weight tensor, or new storage under the same tensor object (w13.data = ...), goes through the checks and
  re-registers;
- a float32 x is rounded to bfloat16 on the checked path;
- a call that the layer refuses gets the Python check's message where one applies (CPU x, wrong dtype), else the
  bad expert id with its int64 value;
- the token offset (first_token of the vLLM/SGLang policies) advances by T on both paths;
- check_ids=False turns the layer's host id check off once, when the layer is built; the default leaves it on;
- under a CUDA-graph capture only the short path reaches the layer, and the layer's refusal is raised as it is;
- the layer's own cudaMalloc failing is retried once after torch.cuda.empty_cache().
The GPU side (bit-identical outputs of both paths, int64 ids, capture and its refusals) is tests/device/test_ep_gpu.py
and tests/cuda/gpu_moe_layer_test.cpp. Skips when the module was not built or torch is missing."""

import os
import sys
import types
import unittest

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
MODULE_DIR = os.path.join(BUILD, "python")

if not os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    print(f"SKIP: {MODULE_DIR}/grace not built (configure with -DGRACE_BUILD_PYTHON=ON)")
    sys.exit(0)
try:
    import torch
    from torch.utils import dlpack
except ImportError as e:
    print(f"SKIP: torch is not importable ({e})")
    sys.exit(0)
sys.path.insert(0, MODULE_DIR)

from grace.ep import _cuda  # noqa: E402

E, K, H, I, S = 8, 2, 16, 8, 8


class FakeLayer:
    """Stands for _grace._ep.GpuLayer: records the calls, refuses what the C++ layer refuses (checked here the
    way dlpack.hpp and GpuMoeLayer do), writes y = 1."""

    def __init__(self, comm, plan, layer, hidden, intermediate, scheme, policy, seed, workspace):
        self.hidden, self.num_experts, self.calls, self.registered = hidden, E, [], 0
        self.host_id_check = []  # the values given to set_host_id_check, in order

    def set_host_id_check(self, on):
        self.host_id_check.append(on)

    def set_expert_weights(self, w13, w2):
        dlpack.from_dlpack(w13), dlpack.from_dlpack(w2)
        self.registered += 1

    def forward_async(self, x, ids, w, out, stream, first_token):
        x, ids, w, out = (dlpack.from_dlpack(c) for c in (x, ids, w, out))
        if x.dtype != torch.bfloat16 or x.shape[1] != self.hidden:
            raise ValueError("x: dtype or shape refused by the layer")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("topk_idx: dtype refused by the layer")
        if w.dtype != torch.float32 or w.shape != ids.shape:
            raise ValueError("topk_weights: dtype or shape refused by the layer")
        if bool((ids >= E).any()):
            raise ValueError("topk_ids[?, ?] is outside [0, 8)")
        self.calls.append((ids.dtype, x.dtype, first_token, int(x.shape[0])))
        out.fill_(1.0)


class CpuAsCuda(unittest.TestCase):
    def setUp(self):
        self.saved = (_cuda._ep, _cuda.available, _cuda._check_tensor, _cuda._stream)
        self.saved_torch = (torch.cuda.current_device, torch.cuda.is_current_stream_capturing)
        torch.cuda.current_device = lambda: 0
        torch.cuda.is_current_stream_capturing = lambda: False
        _cuda._ep = types.SimpleNamespace(GpuLayer=FakeLayer, GpuExperts=lambda: None,
                                          NcclCommunicator=lambda *a: types.SimpleNamespace(size=1), GpuWorkspace=lambda: object())
        _cuda.available = lambda: True
        real_check = self.saved[2]

        def check(t, name, device=None):  # the CUDA device rule relaxed to CPU tensors, the rest as in _cuda
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                if not t.is_contiguous():
                    raise ValueError(f"{name} is not contiguous")
                return
            real_check(t, name, device)

        _cuda._check_tensor = check
        _cuda._stream = lambda device: 0
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(5, H, generator=g).to(torch.bfloat16)
        self.ids = torch.randint(0, E, (5, K), generator=g)
        self.w = torch.rand(5, K, generator=g)
        self.w13 = torch.randn(S, 2 * I, H, generator=g).to(torch.bfloat16)
        self.w2 = torch.randn(S, H, I, generator=g).to(torch.bfloat16)
        self.be = _cuda.CudaBackend({"layers": [{}]}, 0, "1x1", None, share_workspace=False)

    def tearDown(self):
        _cuda._ep, _cuda.available, _cuda._check_tensor, _cuda._stream = self.saved
        torch.cuda.current_device, torch.cuda.is_current_stream_capturing = self.saved_torch

    def test_fast_path_after_the_first_checked_call(self):
        be = self.be
        y = be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(tuple(y.shape), (5, H))
        self.assertEqual(y.dtype, torch.float32)
        self.assertIsNotNone(be._fast)
        calls = []
        _cuda._check_tensor = lambda *a, **k: calls.append(a[1])  # any Python check on the short path shows here
        for _ in range(3):
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(calls, [])
        layer = be._layer
        self.assertEqual(layer.registered, 1)
        # int64 ids reach the layer as int64 (narrowed there), and the token offset advances by T every call.
        self.assertEqual([c[0] for c in layer.calls], [torch.int64] * 4)
        self.assertEqual([c[2] for c in layer.calls], [0, 5, 10, 15])
        self.assertEqual(be._tokens, 20)

    def test_check_ids_reaches_the_layer_once(self):
        self.be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(self.be._layer.host_id_check, [])  # default: the layer's own default (on)
        be = _cuda.CudaBackend({"layers": [{}]}, 0, "1x1", None, share_workspace=False, check_ids=False)
        for _ in range(3):
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(be._layer.host_id_check, [False])
        for bad in (0, "no", None):
            with self.assertRaises(ValueError) as cm:
                _cuda.CudaBackend({"layers": [{}]}, 0, "1x1", None, check_ids=bad)
            self.assertEqual(str(cm.exception), f"check_ids must be True or False, got {bad!r}")

    def test_capture_takes_the_short_path_only(self):
        """Under a CUDA-graph capture (is_current_stream_capturing mocked to True): a first call, or one with
        weights not yet registered, raises before reaching the layer (it would check and register on the host); a
        call on the short path reaches the layer as usual (which decides whether it can be captured), and a
        refusal by the layer is raised as it is (re-checking in Python could sync inside the capture)."""
        be = self.be
        torch.cuda.is_current_stream_capturing = lambda: True
        with self.assertRaises(ValueError) as cm:
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertIn("needs an uncaptured call of this Buffer with the same w13 and w2 first", str(cm.exception))
        self.assertIsNone(be._layer)
        torch.cuda.is_current_stream_capturing = lambda: False
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        torch.cuda.is_current_stream_capturing = lambda: True
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(len(be._layer.calls), 2)
        with self.assertRaises(ValueError) as cm:
            be.moe(self.x, self.ids, self.w, self.w13.clone(), self.w2)  # new weights: not registered in a capture
        self.assertIn("uncaptured call", str(cm.exception))
        self.assertEqual(be._layer.registered, 1)

        def refuse(*args):
            raise ValueError("GpuMoeLayer layer 0 on rank 0: cannot be captured in a CUDA graph: (reason)")
        be._layer.forward_async = refuse
        with self.assertRaises(ValueError) as cm:
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertIn("cannot be captured in a CUDA graph: (reason)", str(cm.exception))

    def test_out_of_memory_is_retried_once_after_empty_cache(self):
        """The layer's cudaMalloc failing (torch's cache holding the memory) is retried once after
        torch.cuda.empty_cache(), on the checked and the short path; a second failure raises the
        layer's message; a rank of a larger group does not retry."""
        emptied = []
        saved = torch.cuda.empty_cache
        torch.cuda.empty_cache = lambda: emptied.append(1)
        try:
            be = self.be
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)  # builds the layer, registers the weights
            layer = be._layer
            real = layer.forward_async
            failures = [1]

            def flaky(*args):
                if failures:
                    failures.pop()
                    raise ValueError("CUDA error cudaErrorMemoryAllocation (out of memory) in cudaMalloc(...)")
                return real(*args)
            layer.forward_async = flaky
            y = be.moe(self.x, self.ids, self.w, self.w13, self.w2)  # short path
            self.assertTrue(bool((y == 1).all()))
            self.assertEqual((len(emptied), len(layer.calls)), (1, 2))
            be._fast = None  # the checked path
            failures.append(1)
            be.moe(self.x, self.ids, self.w, self.w13, self.w2)
            self.assertEqual((len(emptied), len(layer.calls)), (2, 3))
            failures.extend([1, 1])
            with self.assertRaises(ValueError) as cm:
                be.moe(self.x, self.ids, self.w, self.w13, self.w2)
            self.assertIn("cudaErrorMemoryAllocation", str(cm.exception))
            self.assertEqual((len(emptied), len(layer.calls)), (3, 3))
            # In a group of more than one rank a failed call is not redone alone.
            self.assertTrue(be._alone)  # the fake communicator's size is 1
            be._alone = False
            failures.append(1)
            with self.assertRaises(ValueError):
                be.moe(self.x, self.ids, self.w, self.w13, self.w2)
            self.assertEqual((len(emptied), len(layer.calls)), (3, 3))
            be._alone = True
            # Any other refusal is not retried.
            layer.forward_async = lambda *a: (_ for _ in ()).throw(ValueError("topk_ids[0, 0] is outside [0, 8)"))
            with self.assertRaises(ValueError):
                be.moe(self.x, self.ids, self.w, self.w13, self.w2)
            self.assertEqual(len(emptied), 3)
        finally:
            torch.cuda.empty_cache = saved

    def test_new_weights_are_checked_and_registered_again(self):
        be = self.be
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        w13b = self.w13.clone()
        be.moe(self.x, self.ids, self.w, w13b, self.w2)
        self.assertEqual(be._layer.registered, 2)
        be.moe(self.x, self.ids, self.w, w13b, self.w2)
        self.assertEqual(be._layer.registered, 2)
        w13b.data = self.w13.clone()  # same tensor object, new storage
        be.moe(self.x, self.ids, self.w, w13b, self.w2)
        self.assertEqual(be._layer.registered, 3)
        with self.assertRaises(ValueError) as cm:
            be.moe(self.x, self.ids, self.w, self.w13.float(), self.w2)
        self.assertIn("bfloat16", str(cm.exception))

    def test_float32_x_is_rounded_on_the_checked_path(self):
        be = self.be
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        be.moe(self.x.float(), self.ids.to(torch.int32), self.w, self.w13, self.w2)
        self.assertEqual(be._layer.calls[-1][:2], (torch.int32, torch.bfloat16))

    def test_refusals_get_the_python_message(self):
        be = self.be
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        cases = [
            (lambda: be.moe(self.x, self.ids.float(), self.w, self.w13, self.w2),
             "topk_idx must be int64 or int32, got torch.float32"),
            (lambda: be.moe(self.x, self.ids, self.w.double(), self.w13, self.w2),
             "topk_weights must be float32, got torch.float64"),
            (lambda: be.moe(self.x, self.ids[:, :1].contiguous(), self.w, self.w13, self.w2),
             "topk_weights must have topk_idx's shape (5, 1)"),
            (lambda: be.moe(self.x, [[0, 1]] * 5, self.w, self.w13, self.w2),
             "topk_idx must be a torch.Tensor, got list"),
        ]
        bad = self.ids.clone()
        bad[2, 1] = 2**40
        cases.append((lambda: be.moe(self.x, bad, self.w, self.w13, self.w2),
                      f"topk_idx[2, 1] = {2**40} is outside [0, {E})"))
        for call, message in cases:
            with self.assertRaises(ValueError, msg=message) as cm:
                call()
            self.assertIn(message, str(cm.exception))
        # Refused calls do not advance the token offset; the backend still works.
        self.assertEqual(be._tokens, 5)
        be.moe(self.x, self.ids, self.w, self.w13, self.w2)
        self.assertEqual(be._tokens, 10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
