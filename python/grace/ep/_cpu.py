"""The CPU backend of grace.ep: grace::MoeLayer (C++) over the Buffer's host communicator (TorchComm, gloo).

What crosses without copies: contiguous CPU float32 tensors (x, topk_weights, recv_x, recv_weights, expert_out,
float32 w13/w2) and int32 topk_idx/recv_topk go to C++ as NumPy views of the tensor memory (``t.numpy()``); the
outputs (recv_x, recv_topk, recv_weights, expert_out, y) are C++ vectors handed to torch (``torch.from_numpy``) without
a copy. int64 topk_idx is narrowed to int32 (one [T, k] copy). bfloat16 weights are converted to float32 once per
(w13, w2) pair at first use and cached on the Backend (the cache holds the source tensors and their version counter,
so an in-place update of the weights is seen; at most 8 pairs are kept); the module-level experts() converts per
call. Tensors that require grad are read through .detach(): the layer has no backward.
"""

import torch

from .. import GraceError
from .._grace import _ep
from ._torch_comm import TorchComm

_WEIGHT_CACHE_PAIRS = 8


def _np(t):
    return t.detach().numpy()


def _require_cpu(name, t, dtypes):
    if t.device.type != "cpu":
        raise GraceError(f"{name} is on {t.device}; the CPU backend needs CPU tensors")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise GraceError(f"{name} must be {names} on CPU, got {str(t.dtype).replace('torch.', '')}")


def _tokens(x, topk_idx, topk_weights):
    _require_cpu("x", x, (torch.float32,))
    return _np(x), _np(topk_idx), _np(topk_weights)


def _rows(recv_x, recv_topk, recv_weights):
    _require_cpu("recv_x", recv_x, (torch.float32,))
    return _np(recv_x), _np(recv_topk), _np(recv_weights)


def _float_weights(w13, w2):
    _require_cpu("w13", w13, (torch.float32, torch.bfloat16))
    if w13.dtype == torch.float32:
        return _np(w13), _np(w2)
    return _np(w13.detach().float()), _np(w2.detach().float())


class CpuBackend:
    """grace.ep backend for CPU tensors (see the package docstring for the contract): the C++ layer of one rank.

    plan: dict, JSON string or path (grace.plan/v1); layer: index in the plan; topology: "NxM" or (N, M), the group's;
    host_impl: the host communicator object (grace.ep._torch_comm.TorchComm), None for a world of one process;
    scheme, policy, seed: the layer's; timeout: deadline of each collective in seconds (0 = none).
    """

    def __init__(self, plan, layer, topology, host_impl=None, scheme="hsc", policy="tar", seed=0, timeout=300.0):
        if isinstance(topology, str):
            topology = tuple(int(v) for v in topology.lower().split("x"))
        n, m = topology
        if host_impl is None:
            host_impl = TorchComm(None, (n, m), timeout)
        if isinstance(plan, str) and not plan.lstrip().startswith("{"):
            with open(plan) as f:
                plan = f.read()
        self._host_comm = _ep.HostCommunicator(host_impl, f"{n}x{m}", timeout)
        self._layer = _ep.CpuLayer(self._host_comm, plan, layer, f"{n}x{m}", scheme, policy, seed)
        self._cache = []  # [(w13, w2, w13._version, w2._version, w13 float32 numpy, w2 float32 numpy)]

    def _weights(self, w13, w2):
        _require_cpu("w13", w13, (torch.float32, torch.bfloat16))
        if w13.dtype == torch.float32:
            return _np(w13), _np(w2)
        for i, (a, b, va, vb, fa, fb) in enumerate(self._cache):
            if a is w13 and b is w2:
                if va == w13._version and vb == w2._version:
                    return fa, fb
                del self._cache[i]
                break
        fa, fb = _float_weights(w13, w2)
        self._cache.append((w13, w2, w13._version, w2._version, fa, fb))
        del self._cache[:-_WEIGHT_CACHE_PAIRS]
        return fa, fb

    def dispatch(self, x, topk_idx, topk_weights):
        rx, rt, rw, handle = self._layer.dispatch(*_tokens(x, topk_idx, topk_weights))
        return torch.from_numpy(rx), torch.from_numpy(rt), torch.from_numpy(rw), handle

    def experts(self, recv_x, recv_topk, recv_weights, w13, w2):
        w13n, w2n = self._weights(w13, w2)
        return torch.from_numpy(self._layer.experts(*_rows(recv_x, recv_topk, recv_weights), w13n, w2n))

    def combine(self, expert_out, handle):
        _require_cpu("expert_out", expert_out, (torch.float32,))
        if not isinstance(handle, _ep.Handle):
            raise GraceError(f"handle must come from this Buffer's dispatch on CPU, got {type(handle).__name__}")
        return torch.from_numpy(self._layer.combine(_np(expert_out), handle))

    def moe(self, x, topk_idx, topk_weights, w13, w2):
        w13n, w2n = self._weights(w13, w2)
        return torch.from_numpy(self._layer.moe(*_tokens(x, topk_idx, topk_weights), w13n, w2n))

    def last_stats(self):
        return self._layer.last_stats()

    def last_dest_ranks(self):
        """GPU chosen for every selection of the last dispatch, [T * k] int32 (-1 = none)."""
        return torch.from_numpy(self._layer.last_dest_ranks())


def experts(recv_x, recv_topk, recv_weights, w13, w2):
    """grace.ep.experts on CPU tensors (bfloat16 weights are converted on every call; a Buffer caches them)."""
    w13n, w2n = _float_weights(w13, w2)
    return torch.from_numpy(_ep.experts(*_rows(recv_x, recv_topk, recv_weights), w13n, w2n))
