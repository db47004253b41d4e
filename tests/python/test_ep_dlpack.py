"""The DLPack import of the grace.ep CUDA bindings (python/dlpack.hpp), without a GPU: capsules are built here with
ctypes from our own mirror of the DLPack structs, claiming CUDA device 0 with fake data pointers (the checks never
touch the memory). Every malformed argument must raise GraceError (a ValueError) naming the argument and the problem;
a well-formed call with zero rows returns before any CUDA work, and the capsules are left unconsumed. Skips when the
module was built without CUDA (grace._grace._ep.cuda_available missing)."""

import ctypes
import os
import sys
import unittest

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
sys.path.insert(0, os.path.join(BUILD, "python"))
try:
    from grace import _grace
except ImportError:
    _grace = None

CUDA_BUILT = _grace is not None and getattr(getattr(_grace, "_ep", None), "cuda_available", False)

K_DL_CPU, K_DL_CUDA = 1, 2
BF16, F32, I32, I64 = (4, 16, 1), (2, 32, 1), (0, 32, 1), (0, 64, 1)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                            ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor)))]

_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_keep = []  # the structs outlive their capsules (no destructor: this test owns the memory)


def capsule(shape, dtype, strides=None, device=(K_DL_CUDA, 0), name=b"dltensor", data=0x1000):
    n = len(shape)
    shp = (ctypes.c_int64 * max(n, 1))(*shape)
    st = (ctypes.c_int64 * max(n, 1))(*strides) if strides is not None else None
    m = DLManagedTensor()
    m.dl_tensor.data = data
    m.dl_tensor.device = DLDevice(*device)
    m.dl_tensor.ndim = n
    m.dl_tensor.dtype = DLDataType(*dtype)
    m.dl_tensor.shape = shp
    m.dl_tensor.strides = ctypes.cast(st, ctypes.POINTER(ctypes.c_int64)) if st is not None else None
    m.dl_tensor.byte_offset = 0
    _keep.append((m, shp, st))
    return _new_capsule(ctypes.addressof(m), name, None)


@unittest.skipUnless(CUDA_BUILT, "grace._grace built without CUDA")
class DlpackImport(unittest.TestCase):
    H, I, S, K = 64, 32, 4, 2

    def args(self, R=0, **override):
        a = {
            "recv_x": capsule([R, self.H], BF16),
            "recv_topk": capsule([R, self.K], I32),
            "recv_weights": capsule([R, self.K], F32),
            "w13": capsule([self.S, 2 * self.I, self.H], BF16),
            "w2": capsule([self.S, self.H, self.I], BF16),
            "out": capsule([R, self.H], BF16),
        }
        a.update(override)
        return a

    def run_experts(self, **override):
        a = self.args(**override)
        _grace._ep.GpuExperts().run(a["recv_x"], a["recv_topk"], a["recv_weights"], a["w13"], a["w2"], a["out"], 0)
        return a

    def expect(self, needle, **override):
        with self.assertRaises(ValueError) as cm:
            self.run_experts(**override)
        msg = str(cm.exception)
        self.assertEqual(len(msg.splitlines()), 1, msg)
        self.assertIn(needle, msg)

    def test_well_formed_zero_rows_runs_and_leaves_capsules_unconsumed(self):
        a = self.run_experts()
        is_valid = ctypes.pythonapi.PyCapsule_IsValid
        is_valid.restype, is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
        for name, cap in a.items():
            self.assertEqual(is_valid(cap, b"dltensor"), 1, name)

    def test_not_a_capsule(self):
        self.expect("recv_x: expected an unconsumed DLPack capsule", recv_x=[1, 2])

    def test_consumed_capsule(self):
        self.expect("w13: the DLPack capsule was already consumed",
                    w13=capsule([self.S, 2 * self.I, self.H], BF16, name=b"used_dltensor"))

    def test_cpu_tensor(self):
        self.expect("recv_topk: must be a CUDA tensor", recv_topk=capsule([0, self.K], I32, device=(K_DL_CPU, 0)))

    def test_other_device(self):
        self.expect("recv_weights: on cuda:1 but the layer runs on cuda:0",
                    recv_weights=capsule([0, self.K], F32, device=(K_DL_CUDA, 1)))

    def test_dtype(self):
        self.expect("recv_topk: dtype int64, expected int32", recv_topk=capsule([0, self.K], I64))
        self.expect("w2: dtype float32, expected bfloat16", w2=capsule([self.S, self.H, self.I], F32))

    def test_rank_and_sizes(self):
        self.expect("recv_weights: 1 dimensions, expected 2", recv_weights=capsule([0], F32))
        self.expect("recv_weights: shape [0, 3], dimension 1 must be 2", recv_weights=capsule([0, 3], F32))
        self.expect("w2: shape [4, 64, 16], dimension 2 must be 32", w2=capsule([self.S, self.H, 16], BF16))
        self.expect("expert_out: shape [1, 64], dimension 0 must be 0", out=capsule([1, self.H], BF16))

    def test_strides(self):
        # A transposed view of [S, H, 2I] is not contiguous; size-1 dimensions may carry any stride.
        self.expect("w13: not contiguous", w13=capsule([self.S, 2 * self.I, self.H], BF16,
                                                        strides=[2 * self.I * self.H, 1, 2 * self.I]))
        self.run_experts(w13=capsule([1, 2 * self.I, self.H], BF16, strides=[12345, self.H, 1]),
                         w2=capsule([1, self.H, self.I], BF16, strides=[7, self.I, 1]))
        self.run_experts(w13=capsule([self.S, 2 * self.I, self.H], BF16,
                                     strides=[2 * self.I * self.H, self.H, 1]))

    def test_null_data_with_elements(self):
        self.expect("w2: null data pointer", w2=capsule([self.S, self.H, self.I], BF16, data=0))


if __name__ == "__main__":
    unittest.main(verbosity=2)
