"""CUDA backend of ``grace.ep``: ``grace::cuda::GpuMoeLayer`` over NCCL, on torch CUDA tensors (see docs/python.md).

``CudaBackend`` is the object ``grace.ep.Buffer`` uses for CUDA tensors; it has the methods of the CPU backend
(``dispatch``, ``experts``, ``combine``, ``moe``) with the contract's shapes:

    recv_x, recv_topk, recv_weights, handle = backend.dispatch(x, topk_idx, topk_weights)
        x [T, H] bfloat16 or float32 (float32 is rounded to bfloat16: the wire is bf16), topk_idx [T, k] int64 or
        int32 logical expert ids (-1 = none), topk_weights [T, k] float32. recv_x [R, H] bfloat16, recv_topk [R, k]
        int32 local expert slot (row of this rank's w13/w2) or -1, recv_weights [R, k] float32.
    expert_out = backend.experts(recv_x, recv_topk, recv_weights, w13, w2)   -> [R, H] bfloat16
    y = backend.combine(expert_out, handle)                                   -> [T, H] float32
    y = backend.moe(x, topk_idx, topk_weights, w13, w2)                       -> [T, H] float32

w13 [S, 2I, H] and w2 [S, H, I] are bfloat16 CUDA tensors (S = the plan's experts on this rank, in the plan's
order). Every call is collective over the group (every rank calls it, T may be 0) and is queued on torch's current
stream of the tensors' device; it returns without waiting for the GPU except for the host waits that the layout
needs (docs/python.md lists them). Inputs are passed to C++ as DLPack capsules (borrowed, zero copy); outputs are
allocated here with ``torch.empty`` on the same device and filled in place.

Weights: ``moe`` registers (w13, w2) with the layer once and re-registers only when their storage (data_ptr),
shape or device changes; the layer reads them in place, so in-place updates are seen by later calls. The layer
keeps references to the registered tensors.

Router state (WRR/TAR sequence offsets, SGLang-dynamic state) lives in the one C++ layer of this object and carries
across calls of ``dispatch``/``moe``.

Workspace sharing (``share_workspace=True``, the default): the backends of one (CUDA device, host communicator)
share one ``grace::cuda::GpuWorkspace``, the device scratch that a call needs only until it returns (exchange
buffers, LocalMoe's workspace, accumulators), so a model with one Buffer per layer keeps one set of scratch buffers
instead of one per layer. The layers then run one at a time: between a Buffer's ``dispatch`` and its ``combine``
another Buffer sharing the workspace refuses ``dispatch``/``moe`` (GraceError naming both layers). A handle that is
never combined keeps the workspace until its own Buffer's next call. ``share_workspace=False``: the layer's own.
"""

import os
import weakref

import torch
from torch.utils import dlpack as _dlpack

from .. import _grace

_ep = getattr(_grace, "_ep", None)


def available():
    """True when grace._grace was built with CUDA (GRACE_USE_CUDA) and torch sees a CUDA device."""
    return bool(getattr(_ep, "cuda_available", False)) and torch.cuda.is_available()


# (CUDA device index, id of the host communicator object) -> (that object, weak reference to a GpuWorkspace): the
# scratch shared by the Buffers of one group on one device. The Buffers hold the workspace; once the last of them is
# gone (a model deleted or unpatched) its device memory is freed, and the next Buffer gets a new one. The object is
# kept so that its id is not reused while the entry exists.
_WORKSPACES = {}


def shared_workspace(device_index, host_impl):
    """The GpuWorkspace shared by the layers of `host_impl`'s group on CUDA device `device_index` (made on first
    use, or again once every Buffer that held the last one is gone; making one does no CUDA work)."""
    for key in [k for k, (_, ref) in _WORKSPACES.items() if ref() is None]:
        del _WORKSPACES[key]
    key = (int(device_index), id(host_impl))
    entry = _WORKSPACES.get(key)
    workspace = entry[1]() if entry is not None else None
    if workspace is None:
        workspace = _ep.GpuWorkspace()
        _WORKSPACES[key] = (host_impl, weakref.ref(workspace))
    return workspace


_capsule = _dlpack.to_dlpack  # borrowed, zero copy
_BF16, _F32 = torch.bfloat16, torch.float32
# torch's current CUDA stream of a device index as an int, without building a torch.cuda.Stream object (the
# private accessor that Triton and Inductor use; torch.cuda.current_stream where a build lacks it).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device):
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _plan_arg(plan):
    """The plan as the C++ side takes it: a dict or a JSON string (a path is read here)."""
    if isinstance(plan, dict):
        return plan
    if isinstance(plan, os.PathLike) or (isinstance(plan, str) and not plan.lstrip().startswith("{")):
        with open(os.fspath(plan), encoding="utf-8") as f:
            return f.read()
    if isinstance(plan, str):
        return plan
    for attr in ("to_dict", "as_dict"):
        if callable(getattr(plan, attr, None)):
            return getattr(plan, attr)()
    raise ValueError(f"plan must be a path, a JSON string or a dict, got {type(plan).__name__}")


def _check_tensor(t, name, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}, the CUDA backend needs CUDA tensors")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the layer runs on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "call .contiguous()")


def _check_ids(topk_idx):
    """int64 ids go to the layer as they are: it narrows them on the device (one kernel; a value >= E is refused
    after routing, named with its int64 value, so nothing wraps)."""
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    return topk_idx


def _retry_out_of_memory(call):
    """call(), retried once after torch.cuda.empty_cache() when it fails for CUDA memory. The layer's scratch is
    cudaMalloc'ed outside torch's caching allocator, which keeps freed blocks cached for torch: a model that ran
    without grace before (or another model in the same process) can hold the memory the layer needs to grow. Not
    inside a CUDA-graph capture (a captured call allocates nothing, and empty_cache may not run there). Only for
    calls without peers: a rank of a larger group that failed mid-exchange cannot redo its part alone."""
    try:
        return call()
    except ValueError as err:
        if "cudaErrorMemoryAllocation" not in str(err) or torch.cuda.is_current_stream_capturing():
            raise
    torch.cuda.empty_cache()
    return call()


def _bad_id_error(topk_idx, num_experts, err):
    bad = (topk_idx >= num_experts).nonzero()
    if bad.numel() == 0:
        return err
    t, j = (int(v) for v in bad[0])
    return ValueError(f"topk_idx[{t}, {j}] = {int(topk_idx[t, j])} is outside [0, {num_experts})")


class Handle:
    """An open dispatch: valid for exactly one combine (a later dispatch on the same Buffer makes it stale)."""

    def __init__(self, native, device):
        self._native = native
        self._device = device

    @property
    def num_tokens(self):
        return self._native.num_tokens

    @property
    def num_recv(self):
        return self._native.num_recv


class CudaBackend:
    """GpuMoeLayer of one rank. Built lazily on the first call (collective: it creates the NCCL communicator over
    ``host_impl`` and learns H from x); every rank must therefore make its first call at the same point.

    Arguments: plan (path, JSON string or dict), layer (index in the plan), topology ("NxM" or (N, M): must be the
    group's), host_impl (the torch.distributed host communicator object, grace.ep._torch_comm.TorchComm, or None for
    a world of one process), scheme ("hsc", "flat", "flat-dedup"), policy ("tar", "wrr", "primary", "vllm",
    "sglang-static", "sglang-dynamic"), seed, timeout (seconds, 0 = none), share_workspace (bool: the device scratch
    shared with the other backends of this host_impl on the same device, see the module docstring; False: its own),
    check_ids (bool: False = GpuMoeLayer::set_host_id_check(false), the one-GPU path's host wait for the ids' range
    check dropped; ids >= E then select no expert).
    """

    def __init__(self, plan, layer, topology, host_impl=None, scheme="hsc", policy="tar", seed=0, timeout=300.0,
                 share_workspace=True, check_ids=True):
        if not isinstance(share_workspace, bool):
            raise ValueError(f"share_workspace must be True or False, got {share_workspace!r}")
        if not isinstance(check_ids, bool):
            raise ValueError(f"check_ids must be True or False, got {check_ids!r}")
        if not available():
            raise ValueError("grace.ep CUDA backend: grace._grace was built without CUDA or torch sees no GPU")
        self._plan = _plan_arg(plan)
        self._layer_index = int(layer)
        self._topology = topology
        self._host_impl = host_impl
        self._scheme = scheme
        self._policy = policy
        self._seed = int(seed)
        self._timeout = float(timeout)
        self._share_workspace = share_workspace
        self._check_ids = check_ids
        self._workspace = None
        self._comm = None
        self._alone = True
        self._layer = None
        self._device = None
        self._weights_key = None
        self._weights = None
        self._fast = None  # (w13, w2, their data_ptrs, H) once moe() has checked them
        self._tokens = 0  # this rank's tokens so far: first_token of the next call (vLLM / SGLang policies)
        self._experts = _ep.GpuExperts()

    # -- set-up --------------------------------------------------------------------------------------------
    def _ensure(self, x):
        if self._layer is not None:
            if x.device != self._device:
                raise ValueError(f"x is on {x.device} but this Buffer's CUDA layer runs on {self._device}")
            if x.dim() != 2 or x.shape[1] != self._layer.hidden:
                raise ValueError(f"x must be [T, {self._layer.hidden}], got shape {tuple(x.shape)}")
            return
        if x.dim() != 2:
            raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
        self._device = x.device
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self._comm = _ep.NcclCommunicator(self._topology, index, self._timeout, self._host_impl)
        self._alone = self._comm.size == 1  # a group of one process (the out-of-memory retry is for it alone)
        if self._share_workspace:
            self._workspace = shared_workspace(index, self._host_impl)
        self._layer = _ep.GpuLayer(self._comm, self._plan, self._layer_index, int(x.shape[1]), 0, self._scheme,
                                   self._policy, self._seed, self._workspace)
        if not self._check_ids:
            self._layer.set_host_id_check(False)

    def set_experts(self, w13, w2):
        """Registers this rank's expert weights explicitly (moe() does it on demand)."""
        _check_tensor(w13, "w13", self._device)
        _check_tensor(w2, "w2", self._device)
        if w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
            raise ValueError(f"w13 and w2 must be bfloat16 on CUDA, got {w13.dtype} and {w2.dtype}")
        key = (w13.data_ptr(), tuple(w13.shape), w2.data_ptr(), tuple(w2.shape), w13.device)
        if key != self._weights_key:
            self._fast = None
            self._layer.set_expert_weights(_capsule(w13), _capsule(w2))
            self._weights_key = key
            self._weights = (w13, w2)

    def _inputs(self, x, topk_idx, topk_weights):
        _check_tensor(x, "x")
        self._ensure(x)
        _check_tensor(topk_idx, "topk_idx", self._device)
        _check_tensor(topk_weights, "topk_weights", self._device)
        if x.dtype == torch.float32:
            x = x.to(torch.bfloat16)
        elif x.dtype != torch.bfloat16:
            raise ValueError(f"x must be bfloat16 or float32 on CUDA, got {x.dtype}")
        if topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"topk_idx must be [{x.shape[0]}, k], got shape {tuple(topk_idx.shape)}")
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise ValueError(f"topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, "
                             f"got {tuple(topk_weights.shape)}")
        return x, _check_ids(topk_idx)

    # -- the contract --------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights):
        xb, ids = self._inputs(x, topk_idx, topk_weights)
        stream = _stream(self._device)
        try:
            native = self._alone_retry(lambda: self._layer.dispatch(_capsule(xb), _capsule(ids),
                                                                    _capsule(topk_weights), stream, self._tokens))
        except ValueError as err:
            raise _bad_id_error(topk_idx, self._layer.num_experts, err) from None
        self._tokens += int(x.shape[0])
        R, k, H = native.num_recv, int(topk_idx.shape[1]), self._layer.hidden
        recv_x = torch.empty((R, H), dtype=torch.bfloat16, device=self._device)
        recv_topk = torch.empty((R, k), dtype=torch.int32, device=self._device)
        recv_weights = torch.empty((R, k), dtype=torch.float32, device=self._device)
        self._layer.received(native, _capsule(recv_x), _capsule(recv_topk), _capsule(recv_weights), stream)
        return recv_x, recv_topk, recv_weights, Handle(native, self._device)

    def experts(self, recv_x, recv_topk, recv_weights, w13, w2):
        return experts(recv_x, recv_topk, recv_weights, w13, w2, runner=self._experts)

    def combine(self, expert_out, handle):
        if not isinstance(handle, Handle):
            raise ValueError(f"handle must come from this Buffer's dispatch, got {type(handle).__name__}")
        _check_tensor(expert_out, "expert_out", self._device)
        if expert_out.dtype == torch.float32:
            expert_out = expert_out.to(torch.bfloat16)
        elif expert_out.dtype != torch.bfloat16:
            raise ValueError(f"expert_out must be bfloat16 or float32, got {expert_out.dtype}")
        y = torch.empty((handle.num_tokens, self._layer.hidden), dtype=torch.float32, device=self._device)
        self._layer.combine(handle._native, _capsule(expert_out), _capsule(y), _stream(self._device))
        return y

    def moe(self, x, topk_idx, topk_weights, w13, w2):
        # The per-call path, once the layer exists and (w13, w2) are the registered tensors with the same storage:
        # no Python checks, C++ checks every capsule (dtype, shape, device, contiguity) and a refusal is re-checked
        # below for a Python message. This keeps the binding's cost near the capsules and one torch.empty
        # (bench/torch/bm_ep_moe.py measures it).
        fast = self._fast
        if (fast is not None and w13 is fast[0] and w2 is fast[1] and type(x) is torch.Tensor and x.dtype is _BF16
                and w13.data_ptr() == fast[2] and w2.data_ptr() == fast[3]):
            y = torch.empty((x.shape[0], fast[4]), dtype=_F32, device=self._device)
            try:  # a layer allocation failing for memory is retried once in a group of one
                self._alone_retry(lambda: self._layer.forward_async(
                    _capsule(x), _capsule(topk_idx), _capsule(topk_weights), _capsule(y), _stream(self._device),
                    self._tokens))
            except (ValueError, TypeError, AttributeError, RuntimeError) as err:
                self._refused(x, topk_idx, topk_weights, err)
            self._tokens += y.shape[0]
            return y
        return self._moe_checked(x, topk_idx, topk_weights, w13, w2)

    def _alone_retry(self, call):
        """call() with _retry_out_of_memory in a group of one; in a larger group as it is (a combine is never
        retried: the failed call has consumed its handle)."""
        return _retry_out_of_memory(call) if self._alone else call()

    def _refused(self, x, topk_idx, topk_weights, err):
        """Raises the error for a call that the C++ layer (or to_dlpack) refused: the Python checks' message where
        one applies, else the bad expert id, else the layer's own."""
        if isinstance(err, ValueError) and torch.cuda.is_current_stream_capturing():
            raise err  # the layer's reason it cannot be captured (nothing may sync during a capture)
        self._inputs(x, topk_idx, topk_weights)
        if isinstance(err, ValueError):
            raise _bad_id_error(topk_idx, self._layer.num_experts, err) from None
        raise ValueError(str(err)) from err

    def _moe_checked(self, x, topk_idx, topk_weights, w13, w2):
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("grace.ep.moe in a CUDA graph capture needs an uncaptured call of this Buffer with the "
                             "same w13 and w2 first (it checks and registers them on the host), and can be captured "
                             "only on one GPU with check_ids=False; see docs/python.md")
        xb, ids = self._inputs(x, topk_idx, topk_weights)
        self.set_experts(w13, w2)
        y = torch.empty((x.shape[0], self._layer.hidden), dtype=torch.float32, device=self._device)
        try:
            self._alone_retry(lambda: self._layer.forward_async(_capsule(xb), _capsule(ids), _capsule(topk_weights),
                                                                _capsule(y), _stream(self._device), self._tokens))
        except ValueError as err:
            raise _bad_id_error(topk_idx, self._layer.num_experts, err) from None
        self._tokens += int(x.shape[0])
        self._fast = (w13, w2, w13.data_ptr(), w2.data_ptr(), self._layer.hidden)
        return y

    # -- for tests and benchmarks --------------------------------------------------------------------------
    def forward_reference(self, x, topk_idx, topk_weights, w13, w2):
        """The synchronous C++ path (GpuMoeLayer::forward_device: legacy stream, device synchronized) on this
        Buffer's layer (the router state advances as with moe)."""
        xb, ids = self._inputs(x, topk_idx, topk_weights)
        if ids.dtype == torch.int64:  # the reference path takes int32 ids (clamped first, so nothing wraps)
            ids = ids.clamp(min=-1, max=self._layer.num_experts).to(torch.int32)
        self.set_experts(w13, w2)
        y = torch.empty((x.shape[0], self._layer.hidden), dtype=torch.float32, device=self._device)
        torch.cuda.current_stream(self._device).synchronize()  # xb, ids were made on it; the C++ path uses stream 0
        self._layer.forward_device(_capsule(xb), _capsule(ids), _capsule(topk_weights), _capsule(y), self._tokens)
        self._tokens += int(x.shape[0])
        return y

    def last_dest_ranks(self):
        """Destination GPU of every selection of the last call (NumPy int32, flat [T * k], -1 for none)."""
        return self._layer.last_dest_ranks()

    def last_stats(self):
        return self._layer.last_stats()


def experts(recv_x, recv_topk, recv_weights, w13, w2, runner=None):
    """expert_out [R, H] bfloat16 = sum_j recv_weights[r, j] * SwiGLU_{recv_topk[r, j]}(recv_x[r]) on CUDA tensors
    (recv_x bfloat16 or float32, recv_topk int32/int64 local slots, -1 = none; slots outside [0, S) count as -1:
    the GPU cannot refuse them without a host wait), w13 [S, 2I, H] and w2 [S, H, I] bfloat16. Queued on torch's
    current stream; no host wait with the sm90 GEMM (H100/H200), one with the cuBLAS fallback."""
    for t, name in ((recv_x, "recv_x"), (recv_topk, "recv_topk"), (recv_weights, "recv_weights"), (w13, "w13"),
                    (w2, "w2")):
        _check_tensor(t, name, recv_x.device if isinstance(recv_x, torch.Tensor) else None)
    if recv_x.dtype == torch.float32:
        recv_x = recv_x.to(torch.bfloat16)
    elif recv_x.dtype != torch.bfloat16:
        raise ValueError(f"recv_x must be bfloat16 or float32, got {recv_x.dtype}")
    if recv_topk.dtype == torch.int64:
        recv_topk = recv_topk.clamp(min=-1, max=2**31 - 1).to(torch.int32)
    elif recv_topk.dtype != torch.int32:
        raise ValueError(f"recv_topk must be int32 or int64, got {recv_topk.dtype}")
    if recv_weights.dtype != torch.float32:
        raise ValueError(f"recv_weights must be float32, got {recv_weights.dtype}")
    if w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        raise ValueError(f"w13 and w2 must be bfloat16 on CUDA, got {w13.dtype} and {w2.dtype}")
    if recv_x.dim() != 2:
        raise ValueError(f"recv_x must be [R, H], got shape {tuple(recv_x.shape)}")
    out = torch.empty(tuple(recv_x.shape), dtype=torch.bfloat16, device=recv_x.device)
    runner = runner if runner is not None else _default_runner()
    _retry_out_of_memory(lambda: runner.run(_capsule(recv_x), _capsule(recv_topk), _capsule(recv_weights),
                                            _capsule(w13), _capsule(w2), _capsule(out), _stream(recv_x.device)))
    return out


_RUNNER = None


def _default_runner():
    global _RUNNER
    if _RUNNER is None:
        if not available():
            raise ValueError("grace.ep CUDA backend: grace._grace was built without CUDA or torch sees no GPU")
        _RUNNER = _ep.GpuExperts()
    return _RUNNER


__all__ = ["CudaBackend", "Handle", "available", "experts"]
