"""grace.ep: GRACE's expert-parallel MoE layer from PyTorch, with a DeepEP-shaped API (docs/python.md, "grace.ep").

    buf = grace.ep.Buffer(group, plan, layer, topology=None, scheme="hsc", policy="tar", seed=0, timeout=300.0,
                          share_workspace=True, check_ids=True)
    recv_x, recv_topk, recv_weights, handle = buf.dispatch(x, topk_idx, topk_weights)   # collective
    expert_out = buf.experts(recv_x, recv_topk, recv_weights, w13, w2)                  # local
    y = buf.combine(expert_out, handle)                                                  # collective
    y = buf.moe(x, topk_idx, topk_weights, w13, w2)     # == combine(experts(dispatch(...))), bit for bit

Shapes: x [T, H]; topk_idx [T, k] int64 or int32 LOGICAL expert ids (-1 = none); topk_weights [T, k] float32;
recv_x [R, H] (the rows this rank received); recv_topk [R, k] int32 LOCAL slot (index into
``buf.local_experts``, the plan's experts of this rank = rows of w13/w2) or -1; recv_weights [R, k] float32 (0 where
-1); w13 [S, 2I, H] (gate rows, then up rows; y = x W^T), w2 [S, H, I]; expert_out [R, H]; y [T, H] float32.

Backends, chosen by the device of the first call's tensors: CPU tensors -> ``grace.ep._cpu`` (grace::MoeLayer over
the host communicator, float32 activations, float32 or bfloat16 weights); CUDA tensors -> ``grace.ep._cuda``
(grace::cuda::GpuMoeLayer over NCCL, bootstrapped through the same host communicator).

The first Buffer of a (group, topology, timeout) is collective: it creates the host communicator
(grace.ep._torch_comm.TorchComm: gloo groups made with dist.new_group, which every process of the default group must
enter in the same order); later Buffers with the same three share it (one Buffer per layer of a model).

share_workspace (CUDA; default True): the Buffers of one group on one device share one set of device scratch
buffers (grace::cuda::GpuWorkspace: exchange buffers, expert workspace, accumulators), sized by the largest call of
any of them, instead of one set per Buffer. They must then run one at a time: while a Buffer's dispatch is not yet
combined, dispatch/moe of another sharing Buffer raises GraceError naming both layers (never a silent overwrite).
Pass share_workspace=False to a Buffer whose handle must stay open across other layers' calls. No effect on CPU.

check_ids (CUDA; default True): on one GPU, ``moe`` maps ids to local slots on the device and its one host wait is
the range check of the ids (an id >= E raises). check_ids=False drops that wait, so the Python thread runs ahead of
the GPU: an id >= E then selects no expert (as -1 does) and is not reported. For ids that are a top-k over the
model's E router logits (grace.hf passes False). With several GPUs, and on CPU, ids are always checked. With
check_ids=False, ``moe`` on one GPU can be captured in a CUDA graph after one uncaptured call (docs/python.md,
"CUDA graphs").

Backend contract (``_cpu.CpuBackend`` and ``_cuda.CudaBackend``): built on first use as
``Backend(plan, layer, topology, host_impl=torch_comm, scheme=, policy=, seed=, timeout=)`` with the Buffer's
validated plan dict, layer index, (N, M) and its TorchComm; methods ``dispatch``, ``experts``, ``combine``, ``moe``
with the signatures above (inputs already checked for type, rank, matching shapes and the dtypes common to both
backends), ``last_stats()`` and ``last_dest_ranks()``; each backend module also has a module-level
``experts(recv_x, recv_topk, recv_weights, w13, w2)``.

Errors: bad dtype, device, shape, non-contiguous tensors, an expert id out of range, a plan for another expert count
(``num_experts=``), a topology that does not match the group raise grace.GraceError (a ValueError) with a one-line
message naming the argument. A bad input found on one rank raises there before any communication; the other ranks
then stop at their deadline (``timeout``), as torch.distributed cannot abort the job.
"""

import json
import operator
import os

from .. import GraceError

__all__ = ["Buffer", "experts", "moe", "GraceError"]

SCHEMES = ("flat", "flat-dedup", "hsc")


def _fail(message):
    raise GraceError(message)


def _plan_dict(plan):
    """A path, a JSON string, a dict or an object with to_dict()/to_json() -> the grace.plan/v1 dict."""
    if isinstance(plan, dict):
        return plan
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    if hasattr(plan, "to_json"):
        return json.loads(plan.to_json())
    if isinstance(plan, os.PathLike) or (isinstance(plan, str) and not plan.lstrip().startswith("{")):
        path = os.fspath(plan)
        if not os.path.isfile(path):
            _fail(f"plan: {path!r} is neither a file nor a JSON object")
        with open(path) as f:
            text = f.read()
    elif isinstance(plan, str):
        text = plan
    else:
        _fail(f"plan must be a path, a JSON string or a dict, got {type(plan).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"plan: not valid JSON ({e})")


def _integer(value, name):
    """An int (numpy integers too), not a bool or a float; else GraceError naming the argument."""
    try:
        if not isinstance(value, bool):
            return int(operator.index(value))
    except TypeError:
        pass
    _fail(f"{name} must be an integer, got {type(value).__name__} {value!r}")


def _topology(value, fallback):
    if value is None:
        value = fallback
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            _fail(f"topology {value!r} must be 'NxM'")
        value = (int(parts[0]), int(parts[1]))
    elif isinstance(value, dict):  # the plan's {"nodes": N, "gpus_per_node": M}
        if "nodes" not in value or "gpus_per_node" not in value:
            _fail(f"topology {value!r} must have 'nodes' and 'gpus_per_node'")
        value = (value["nodes"], value["gpus_per_node"])
    try:
        n, m = (int(v) for v in value)
    except (TypeError, ValueError):
        _fail(f"topology must be 'NxM' or (N, M), got {value!r}")
    if n < 1 or m < 1:
        _fail(f"topology {n}x{m}: nodes and GPUs per node must be >= 1")
    return n, m


def _is_tensor(t):
    import torch
    return isinstance(t, torch.Tensor)


def _check_tensor(t, name, ndim, dims):
    if not _is_tensor(t):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must have shape {dims}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous (call .contiguous())")


def _check_dtype(t, name, allowed):
    if t.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        _fail(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(device, **tensors):
    for name, t in tensors.items():
        if t.device != device:
            _fail(f"{name} is on {t.device}, x is on {device}: all tensors must be on one device")


def _check_tokens(x, topk_idx, topk_weights):
    import torch
    _check_tensor(x, "x", 2, "[T, H]")
    _check_tensor(topk_idx, "topk_idx", 2, "[T, k]")
    _check_tensor(topk_weights, "topk_weights", 2, "[T, k]")
    _check_dtype(topk_idx, "topk_idx", (torch.int64, torch.int32))
    _check_dtype(topk_weights, "topk_weights", (torch.float32,))
    if topk_idx.shape[0] != x.shape[0] or tuple(topk_weights.shape) != tuple(topk_idx.shape):
        _fail(f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} "
              "must be [T, H], [T, k], [T, k]")
    if topk_idx.shape[1] < 1:
        _fail(f"topk_idx must have k >= 1 columns, got {tuple(topk_idx.shape)}")
    _check_same_device(x.device, topk_idx=topk_idx, topk_weights=topk_weights)


def _check_rows(recv_x, recv_topk, recv_weights):
    import torch
    _check_tensor(recv_x, "recv_x", 2, "[R, H]")
    _check_tensor(recv_topk, "recv_topk", 2, "[R, k]")
    _check_tensor(recv_weights, "recv_weights", 2, "[R, k]")
    _check_dtype(recv_topk, "recv_topk", (torch.int32,))
    _check_dtype(recv_weights, "recv_weights", (torch.float32,))
    if recv_topk.shape[0] != recv_x.shape[0] or tuple(recv_weights.shape) != tuple(recv_topk.shape):
        _fail(f"recv_x {tuple(recv_x.shape)}, recv_topk {tuple(recv_topk.shape)} and recv_weights "
              f"{tuple(recv_weights.shape)} must be [R, H], [R, k], [R, k]")
    _check_same_device(recv_x.device, recv_topk=recv_topk, recv_weights=recv_weights)


def _check_weights(w13, w2, device):
    _check_tensor(w13, "w13", 3, "[S, 2I, H]")
    _check_tensor(w2, "w2", 3, "[S, H, I]")
    if w13.dtype != w2.dtype:
        _fail(f"w13 and w2 must have one dtype, got {w13.dtype} and {w2.dtype}")
    _check_same_device(device, w13=w13, w2=w2)


def _backend_module(device):
    if device.type == "cpu":
        from . import _cpu
        return _cpu
    if device.type == "cuda":
        try:
            from . import _cuda
        except ImportError as e:
            raise GraceError(f"CUDA tensors need the grace.ep CUDA backend (grace/ep/_cuda.py and a CUDA build of "
                             f"grace._grace), which is not available here: {e}") from e
        return _cuda
    _fail(f"tensors on {device} are not supported (cpu or cuda)")


# (group object, topology, timeout) -> (group object, TorchComm, HostCommunicator): the Buffers of one model (one
# per layer) share their gloo groups, as they call the layer one after another. The group object is kept so that its
# id is not reused while the entry exists.
_COMMUNICATORS = {}


def _communicators(group, topology, timeout):
    from .._grace import _ep
    from ._torch_comm import TorchComm
    import torch.distributed as dist
    group_obj = group
    if group is None and dist.is_available() and dist.is_initialized():
        group_obj = dist.group.WORLD
    key = (id(group_obj), tuple(topology), timeout)
    if key not in _COMMUNICATORS:
        torch_comm = TorchComm(group, topology, timeout)  # checks N*M against the group size
        host_comm = _ep.HostCommunicator(torch_comm, "%dx%d" % tuple(topology), timeout)
        _COMMUNICATORS[key] = (group_obj, torch_comm, host_comm)
    return _COMMUNICATORS[key][1:]


class Buffer:
    """An expert-parallel MoE layer of a GRACE plan over a torch.distributed group (see the module docstring).

    group: ProcessGroup or None (the default group; a single process needs no torch.distributed). plan: path, JSON
    string or dict (grace.plan/v1). layer: MoE layer index in the plan. topology: "NxM" or (N, M), default the
    plan's; N*M must equal the group size; rank r of the group is GPU r of the plan (node r // M). scheme: flat,
    flat-dedup or hsc. policy: a replica routing policy (tar, wrr, primary, ...); its state (WRR counters) carries
    across calls. timeout: deadline of each collective in seconds (0 = none). num_experts: if given, the model's
    expert count, which must equal the plan's. share_workspace: True (default) or False, CUDA only: share the
    device scratch with the other Buffers of this group on the same device (see the module docstring). check_ids:
    True (default) or False, CUDA only: False drops the one-GPU path's host wait for the ids' range check (see the
    module docstring).
    """

    def __init__(self, group=None, plan=None, layer=0, *, topology=None, scheme="hsc", policy="tar", seed=0,
                 timeout=300.0, num_experts=None, share_workspace=True, check_ids=True):
        if plan is None:
            _fail("plan is required (a path, a JSON string or a dict)")
        from .._grace import validate_plan
        # Validated and normalised by the C++ parser, so that local_experts lists this rank's experts in the order
        # of the layer's local slots.
        self.plan = validate_plan(_plan_dict(plan))
        self.plan_json = json.dumps(self.plan)
        layers = self.plan.get("layers", [])
        # Any integer type (numpy.int64 included; it was refused as 'outside' the range it is in), not a bool.
        layer = _integer(layer, "layer")
        if not 0 <= layer < len(layers):
            _fail(f"layer {layer!r} is outside [0, {len(layers)}) (the plan's MoE layers)")
        self.layer = layer
        self.num_experts = int(self.plan.get("num_experts", 0))
        if num_experts is not None and _integer(num_experts, "num_experts") != self.num_experts:
            _fail(f"the plan is for {self.num_experts} experts, the model has num_experts={num_experts}")
        if not isinstance(share_workspace, bool):
            _fail(f"share_workspace must be True or False, got {share_workspace!r}")
        self.share_workspace = share_workspace
        if not isinstance(check_ids, bool):
            _fail(f"check_ids must be True or False, got {check_ids!r}")
        self.check_ids = check_ids
        if scheme not in SCHEMES:
            _fail(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        seed = _integer(seed, "seed")  # the routers take a uint64 (a float was truncated, -1 a pybind TypeError)
        if not 0 <= seed < 2**64:
            _fail(f"seed {seed} is outside [0, 2^64)")
        self.scheme, self.policy, self.seed = scheme, str(policy), seed
        from .._grace import ReplicaRouter
        ReplicaRouter(self.plan, layer, self.policy, self.seed)  # an unknown policy fails here, not at the first call
        if not (isinstance(timeout, (int, float)) and 0 <= timeout < float("inf")):
            _fail(f"timeout {timeout!r} must be a finite number of seconds >= 0 (0 = none)")
        self.timeout = float(timeout)
        self.topology = _topology(topology, self.plan.get("topology"))
        n, m = self.topology
        self.torch_comm, self.host_comm = _communicators(group, (n, m), self.timeout)
        self.group = group
        self.rank, self.num_ranks = self.host_comm.rank, self.host_comm.size
        gpu_experts = layers[layer].get("gpu_experts", [])
        if len(gpu_experts) != n * m:
            _fail(f"topology {n}x{m} has {n * m} GPUs, the plan's layer {layer} places experts on {len(gpu_experts)}")
        self.local_experts = list(gpu_experts[self.rank])
        self._backend = None
        self._device_type = None

    def _backend_for(self, device):
        if self._backend is None:
            module = _backend_module(device)
            if device.type == "cpu":
                # The CPU layer has no device scratch to share, and checks ids at no cost.
                backend, extra = module.CpuBackend, {}
            else:
                backend, extra = module.CudaBackend, {"share_workspace": self.share_workspace,
                                                      "check_ids": self.check_ids}
            self._backend = backend(self.plan, self.layer, self.topology, host_impl=self.torch_comm,
                                    scheme=self.scheme, policy=self.policy, seed=self.seed, timeout=self.timeout,
                                    **extra)
            self._device_type = device.type
        elif device.type != self._device_type:
            _fail(f"this Buffer runs on {self._device_type}; got tensors on {device}")
        return self._backend

    def dispatch(self, x, topk_idx, topk_weights):
        """Collective -> (recv_x [R, H], recv_topk [R, k] int32 local slot or -1, recv_weights [R, k], handle)."""
        _check_tokens(x, topk_idx, topk_weights)
        return self._backend_for(x.device).dispatch(x, topk_idx, topk_weights)

    def experts(self, recv_x, recv_topk, recv_weights, w13, w2):
        """Local -> expert_out [R, H]: sum_j recv_weights[r, j] * SwiGLU_{recv_topk[r, j]}(recv_x[r])."""
        _check_rows(recv_x, recv_topk, recv_weights)
        _check_weights(w13, w2, recv_x.device)
        return self._backend_for(recv_x.device).experts(recv_x, recv_topk, recv_weights, w13, w2)

    def combine(self, expert_out, handle):
        """Collective -> y [T, H] float32, the sum over each token's selections; consumes the handle."""
        _check_tensor(expert_out, "expert_out", 2, "[R, H]")
        return self._backend_for(expert_out.device).combine(expert_out, handle)

    def moe(self, x, topk_idx, topk_weights, w13, w2):
        """The whole layer: combine(experts(dispatch(...))) -> y [T, H] float32."""
        if self._device_type == "cuda":
            # The CUDA backend checks every call itself (C++ on the capsules, then these checks' messages for a
            # refused call), so its per-call cost stays small (docs/python.md).
            return self._backend.moe(x, topk_idx, topk_weights, w13, w2)
        _check_tokens(x, topk_idx, topk_weights)
        _check_weights(w13, w2, x.device)
        return self._backend_for(x.device).moe(x, topk_idx, topk_weights, w13, w2)

    def last_stats(self):
        """The layer's statistics of the last call (times, bytes per link class), {} before any call."""
        return self._backend.last_stats() if self._backend is not None else {}

    def last_dest_ranks(self):
        """GPU (group rank) chosen for every selection of the last dispatch, flat [T * k] int32 (-1 = none)."""
        if self._backend is None:
            _fail("no dispatch yet")
        return self._backend.last_dest_ranks()


def experts(recv_x, recv_topk, recv_weights, w13, w2, buffer=None):
    """expert_out [R, H] = sum_j recv_weights[r, j] * SwiGLU_{recv_topk[r, j]}(recv_x[r]), on the device of recv_x.
    With a buffer, as buffer.experts (w13 must hold its rank's local experts)."""
    if buffer is not None:
        return buffer.experts(recv_x, recv_topk, recv_weights, w13, w2)
    _check_rows(recv_x, recv_topk, recv_weights)
    _check_weights(w13, w2, recv_x.device)
    return _backend_module(recv_x.device).experts(recv_x, recv_topk, recv_weights, w13, w2)


def moe(x, topk_idx, topk_weights, w13, w2, buffer=None):
    """buffer.moe(x, topk_idx, topk_weights, w13, w2): the whole expert-parallel layer -> y [T, H] float32."""
    if not isinstance(buffer, Buffer):
        _fail(f"moe needs buffer=grace.ep.Buffer(...), got {type(buffer).__name__}")
    return buffer.moe(x, topk_idx, topk_weights, w13, w2)
