"""Run the routed experts of a Hugging Face transformers MoE model through ``grace.ep`` (GRACE's expert-parallel
layer), in place: ``grace.hf.patch(model, plan)``.

Supported MoE blocks: OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V2/V3 (``grace.recorder.MOE_BLOCK_CLASSES``)
and GPT-OSS (``GptOssMLP``). Plan layer ``l`` is the model's ``l``-th MoE block in module order (the layer order
of a trace recorded by ``grace.recorder``); the plan must have exactly one layer per MoE block and the model's
expert count. Each MoE block gets one ``grace.ep.Buffer`` and this rank's expert weights re-laid out once into its
local slots (``w13`` [S_local, 2I, H] gate rows then up rows, ``w2`` [S_local, H, I]; expert ``gpu_experts[rank][s]``
of the plan in slot ``s``). Where the layout already is that one (one rank holding every expert once, in order,
weights stored [E, 2I, H] / [E, H, I]) the model's own tensors are used, without a copy.

Two ways in, chosen per block:

* transformers 5.x blocks hand a fused experts module ``block.experts(hidden [N, H], top_k_index [N, k],
  top_k_weights [N, k])``: that module is replaced by ``GraceExperts``. The block's own router, shared experts
  (Qwen2-MoE ``shared_expert`` + ``shared_expert_gate``, DeepSeek ``shared_experts``), DeepSeek group-limited
  selection and output structure run unchanged; only the routed experts move to grace.ep.
* transformers 4.x blocks (``experts`` an ``nn.ModuleList`` of per-expert MLPs, ``gate`` an ``nn.Linear`` or a
  router returning its selection) are replaced by ``GraceMoeBlock``, which calls the block's ``gate``, selects
  experts with ``grace.recorder``'s per-family routing (``route_from_logits`` + ``routing_kwargs``, the code the
  recorder uses), runs grace.ep, adds the shared experts by calling the original modules, and returns what the
  original block returned (a tensor, or ``(hidden, router_logits)`` - found by calling it once on one token).

Experts must be SwiGLU (``down(act(gate(x)) * up(x))`` with ``act`` = SiLU), which is what ``grace.ep`` computes.
Before anything is replaced, each block's experts are checked numerically: the original experts module is run on a
probe (one token per expert) and compared with the re-laid-out weights; a mismatch (another activation, an unknown
weight layout) raises ``ValueError`` naming the block and the error, and nothing is patched.

GPT-OSS experts are not plain SwiGLU: biases on both projections, gate/up interleaved in ``gate_up_proj``
[E, H, 2I] (x @ W), and a clamped activation ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
``g = clamp(gate, max=limit)`` (alpha 1.702, limit 7.0; transformers ``GptOssExperts``). grace.ep's fused
``experts`` step cannot express that, so GPT-OSS layers use grace.ep's ``dispatch`` and ``combine`` (the
communication and replica choice) with the GPT-OSS expert function computed here in PyTorch on this rank's slots.

Restore the stock modules with ``grace.hf.unpatch(model)``.
"""

from __future__ import annotations

import json
import os

from .recorder import MOE_BLOCK_CLASSES, _cfg, route_from_logits, routing_kwargs, selection_from_router_output

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover - importing grace without torch must work
    torch = None
    F = None
    nn = None

# The MoE blocks grace.hf patches: the recorder's (class name -> routing family) plus GPT-OSS.
HF_MOE_BLOCKS = dict(MOE_BLOCK_CLASSES, GptOssMLP="gpt_oss")

_PATCHES_ATTR = "_grace_hf_patches"


class PatchError(ValueError):
    """The model (or plan) cannot be patched; the message names the block and the reason."""


# ---------------------------------------------------------------------------------------------------------------
# plan and group helpers


def _plan_dict(plan):
    if isinstance(plan, dict):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        text = str(plan)
        if text.lstrip().startswith("{"):
            return json.loads(text)
        if not os.path.isfile(text):
            what = "is a folder, not a plan file" if os.path.isdir(text) else "no such file"
            raise PatchError(f"plan: {text!r} {what} (give a path, a JSON string or a plan dict)")
        with open(text, encoding="utf-8") as f:
            return json.load(f)
    import grace  # an ExpertPlan binding object

    return json.loads(grace.plan_to_json(plan))


def _group_rank(group):
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(group) if group is not None else dist.get_rank()
    if group is not None:
        raise PatchError("group given but torch.distributed is not initialised")
    return 0


def _default_buffer_factory(group, plan, layer, **kwargs):
    from . import ep

    return ep.Buffer(group, plan, layer, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# expert weights: reading the model's layouts, probing, re-laying out


def _is_silu(act):
    if isinstance(act, nn.SiLU) or act is F.silu:
        return True
    name = type(act).__name__.lower()
    return "silu" in name or "swish" in name


class _Layout:
    """How one block's experts store their weights.

    kind: "fused" ([E, 2I, H] gate|up, [E, H, I]), "fused_t" ([E, H, 2I] gate|up, [E, I, H], x @ W),
    "gpt_oss" ([E, H, 2I] interleaved + biases, [E, I, H] + bias), "list" (ModuleList of gate/up/down MLPs).
    """

    def __init__(self, kind, num_experts, hidden, inter):
        self.kind, self.num_experts, self.hidden, self.inter = kind, num_experts, hidden, inter


def _mlp_weights(mlp):
    """(gate [I, H], up [I, H], down [H, I]) of one 4.x expert MLP (Mixtral w1/w3/w2 or gate/up/down_proj)."""
    for g, u, d in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in (g, u, d)):
            lins = [getattr(mlp, n) for n in (g, u, d)]
            if any(lin.bias is not None for lin in lins):
                raise PatchError(f"{type(mlp).__name__}: expert projections with biases are not SwiGLU as grace.ep "
                                 "computes it")
            return lins[0].weight, lins[1].weight, lins[2].weight
    raise PatchError(f"{type(mlp).__name__}: expert MLP without gate_proj/up_proj/down_proj (or w1/w3/w2) Linear "
                     "layers")


def _expert_layout(name, experts):
    if isinstance(experts, nn.ModuleList):
        if len(experts) == 0:
            raise PatchError(f"{name}: empty experts ModuleList")
        gate = _mlp_weights(experts[0])[0]
        return _Layout("list", len(experts), gate.shape[1], gate.shape[0])
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (torch.is_tensor(gu) and torch.is_tensor(dn) and gu.dim() == 3 and dn.dim() == 3):
        raise PatchError(f"{name}: experts module {type(experts).__name__} has no 3-d gate_up_proj/down_proj "
                         "parameters (not a transformers fused experts module grace.hf knows)")
    e = gu.shape[0]
    if hasattr(experts, "gate_up_proj_bias") or hasattr(experts, "down_proj_bias"):
        return _Layout("gpt_oss", e, gu.shape[1], gu.shape[2] // 2)
    # [E, 2I, H] + [E, H, I] versus [E, H, 2I] + [E, I, H]; equal sizes are decided by the probe.
    if gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]:
        return _Layout("fused", e, gu.shape[2], gu.shape[1] // 2)
    if gu.shape[2] == 2 * dn.shape[1] and gu.shape[1] == dn.shape[2]:
        return _Layout("fused_t", e, gu.shape[1], gu.shape[2] // 2)
    raise PatchError(f"{name}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are no SwiGLU "
                     "expert layout grace.hf knows")


def _expert_tensors(experts, layout, ids):
    """The weights of experts ``ids`` in grace.ep's layout: (w13 [S, 2I, H], w2 [S, H, I]); GPT-OSS: the native
    tensors (w13 [S, H, 2I], b13 [S, 2I], w2 [S, I, H], b2 [S, H]). Identity layouts come back as the model's
    own tensors (no copy)."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    identity = list(ids) == list(range(layout.num_experts))
    with torch.no_grad():
        if layout.kind == "list":
            w13 = torch.stack([torch.cat(_mlp_weights(experts[i])[:2], 0) for i in ids])
            w2 = torch.stack([_mlp_weights(experts[i])[2] for i in ids])
            return w13.contiguous(), w2.contiguous()
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if layout.kind == "gpt_oss":
            pick = (lambda t: t) if identity else (lambda t: t.index_select(0, ids_t.to(t.device)).contiguous())
            return (pick(gu), pick(experts.gate_up_proj_bias.detach()), pick(dn),
                    pick(experts.down_proj_bias.detach()))
        if layout.kind == "fused_t":
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        if identity and gu.is_contiguous() and dn.is_contiguous():
            return gu, dn
        idx = ids_t.to(gu.device)
        return gu.index_select(0, idx).contiguous(), dn.index_select(0, idx).contiguous()


def _swiglu_ref(x, w13, w2):
    """Reference expert s on row s of x: [S, H] -> [S, H] (float32)."""
    inter = w13.shape[1] // 2
    h = torch.einsum("sh,sih->si", x.float(), w13.float())
    return torch.einsum("si,shi->sh", F.silu(h[:, :inter]) * h[:, inter:], w2.float())


def gpt_oss_expert(x, w13, b13, w2, b2, alpha=1.702, limit=7.0):
    """GPT-OSS expert on rows x [n, H] with one expert's native weights (w13 [H, 2I] interleaved gate/up, b13 [2I],
    w2 [I, H], b2 [H]) -> [n, H] in the weights' dtype, as transformers ``GptOssExperts`` computes it."""
    gu = x.to(w13.dtype) @ w13 + b13
    gate = gu[..., ::2].clamp(max=limit)
    up = gu[..., 1::2].clamp(min=-limit, max=limit)
    return ((up + 1) * (gate * torch.sigmoid(gate * alpha))) @ w2 + b2


def _call_experts(experts, x, idx, w):
    """Runs a 5.x fused experts module; falls back to the dense [N, E] score form of older GPT-OSS."""
    try:
        return experts(x, idx, w)
    except (RuntimeError, IndexError, ValueError):
        dense = torch.zeros(x.shape[0], getattr(experts, "num_experts", int(idx.max()) + 1), dtype=w.dtype,
                            device=w.device).scatter_(1, idx, w)
        return experts(x, idx, dense)


def _probe(name, experts, layout):
    """Checks that the re-laid-out weights reproduce the experts module: expert e on probe row e. Returns the
    relative error; raises PatchError when it is too large for the weights' dtype."""
    p = next(iter(experts.parameters()))
    gen = torch.Generator(device="cpu").manual_seed(1234)
    e, h = layout.num_experts, layout.hidden
    x = (torch.randn(e, h, generator=gen) * 0.5).to(device=p.device, dtype=p.dtype)
    ids = list(range(e))
    with torch.no_grad():
        if layout.kind == "list":
            got = torch.stack([experts[i](x[i:i + 1])[0] for i in ids]).float()
        else:
            idx = torch.arange(e, device=p.device).unsqueeze(1)
            w = torch.ones(e, 1, device=p.device, dtype=p.dtype)
            out = _call_experts(experts, x, idx, w)
            got = (out[0] if isinstance(out, (tuple, list)) else out).reshape(e, h).float()
        t = _expert_tensors(experts, layout, ids)
        if layout.kind == "gpt_oss":
            alpha, limit = float(getattr(experts, "alpha", 1.702)), float(getattr(experts, "limit", 7.0))
            ref = torch.stack([gpt_oss_expert(x[i:i + 1].float(), *(a[i].float() for a in t), alpha, limit)[0]
                               for i in ids])
        else:
            ref = _swiglu_ref(x, *t)
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    if not err <= tol:
        what = ("GPT-OSS clamped SwiGLU with biases" if layout.kind == "gpt_oss"
                else f"SwiGLU (SiLU) with the {layout.kind} weight layout")
        raise PatchError(f"{name}: the experts module {type(experts).__name__} is not {what}: relative error "
                         f"{err:.3g} > {tol:g} on a probe; grace.ep computes SwiGLU only, so this block is not "
                         "patched")
    return err


# ---------------------------------------------------------------------------------------------------------------
# replacement modules


def _ep_inputs(x, idx, w):
    """x [N, H] in the wire dtype grace.ep takes (CPU: float32; CUDA: bfloat16 kept, else float32), ids int64,
    weights float32 [N, k] (a dense [N, E] score matrix is reduced to the k chosen)."""
    x = x.reshape(-1, x.shape[-1])
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    idx = idx.reshape(x.shape[0], -1).to(torch.long)
    w = w.reshape(x.shape[0], -1)
    if w.shape[1] != idx.shape[1]:
        w = w.gather(1, idx.clamp_min(0))
    return x.contiguous(), idx.contiguous(), w.to(torch.float32).contiguous()


class GraceExperts(nn.Module if nn is not None else object):
    """Stands in for a transformers 5.x fused experts module: ``forward(hidden [N, H], top_k_index [N, k],
    top_k_weights [N, k] (or dense [N, E])) -> [N, H]`` in the hidden dtype, computed by grace.ep."""

    def __init__(self, buffer, tensors, kind, alpha=1.702, limit=7.0, num_experts=0):
        super().__init__()
        self.buffer, self.kind, self.alpha, self.limit = buffer, kind, alpha, limit
        self.num_experts = num_experts
        self._tensors = tensors  # not registered: they are (views of) the model's weights, never trained here

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
        if top_k_index is None:
            top_k_index = kwargs.get("router_indices")
        if top_k_weights is None:
            top_k_weights = kwargs.get("routing_weights")
        x, idx, w = _ep_inputs(hidden_states, top_k_index, top_k_weights)
        if self.kind == "gpt_oss":
            y = _gpt_oss_moe(self.buffer, x, idx, w, self._tensors, self.alpha, self.limit)
        else:
            y = self.buffer.moe(x, idx, w, *self._tensors)
        return y.to(hidden_states.dtype).reshape(hidden_states.shape)


def _gpt_oss_moe(buf, x, idx, w, tensors, alpha, limit):
    recv_x, recv_topk, recv_w, handle = buf.dispatch(x, idx, w)
    w13, b13, w2, b2 = tensors
    out = torch.zeros(recv_x.shape[0], recv_x.shape[1], dtype=torch.float32, device=recv_x.device)
    recv_topk = recv_topk.long()
    for s in torch.unique(recv_topk[recv_topk >= 0]).tolist():
        rows, j = torch.nonzero(recv_topk == s, as_tuple=True)
        o = gpt_oss_expert(recv_x[rows], w13[s], b13[s], w2[s], b2[s], alpha, limit)
        out.index_add_(0, rows, o.float() * recv_w[rows, j, None].float())
    return buf.combine(out.to(recv_x.dtype), handle)


class GraceMoeBlock(nn.Module if nn is not None else object):
    """Replaces a transformers 4.x MoE block (``gate`` + ModuleList ``experts``): the block's gate, the recorder's
    per-family top-k selection, grace.ep for the routed experts, the original shared experts."""

    def __init__(self, original, family, config, buffer, tensors, top_k, returns_tuple):
        super().__init__()
        self.original = original  # kept as a submodule: its gate and shared experts run from here
        self.family, self.config, self.buffer, self._tensors = family, config, buffer, tensors
        self.top_k, self.returns_tuple = top_k, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        m = self.original
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        gate_out = m.gate(h)
        sel = selection_from_router_output(gate_out)
        logits = None
        if sel is not None:
            idx, w = sel
            if w is None:
                raise PatchError(f"{type(m).__name__}: its router returned ids without weights")
        else:
            logits = gate_out[0] if isinstance(gate_out, (tuple, list)) else gate_out
            idx, w = route_from_logits(logits, self.family, self.top_k, **routing_kwargs(m, self.config))
        x, idx, w = _ep_inputs(h, idx, w)
        y = self.buffer.moe(x, idx, w, *self._tensors).to(hidden_states.dtype)
        shared = getattr(m, "shared_expert", None)
        if shared is not None:  # Qwen2-MoE: sigmoid-gated shared expert
            s = shared(h)
            sg = getattr(m, "shared_expert_gate", None)
            y = y + (torch.sigmoid(sg(h)) * s if sg is not None else s)
        shared = getattr(m, "shared_experts", None)
        if shared is not None:  # DeepSeek: always-on shared experts
            y = y + shared(h)
        y = y.reshape(hidden_states.shape)
        return (y, logits) if self.returns_tuple else y


# ---------------------------------------------------------------------------------------------------------------
# patch / unpatch


def moe_blocks(model):
    """[(qualified name, module, family)] of the MoE blocks grace.hf recognises, in module order."""
    return [(n, m, HF_MOE_BLOCKS[type(m).__name__]) for n, m in model.named_modules()
            if type(m).__name__ in HF_MOE_BLOCKS]


def _parent(model, name):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def patch(model, plan, *, group=None, topology=None, scheme="hsc", policy="tar", seed=0, timeout=300.0,
          share_workspace=True, check_ids=False, buffer_factory=None):
    """Runs every MoE block's routed experts of ``model`` through grace.ep with ``plan``; returns ``model``.

    Args:
        model: a transformers MoE model (any module tree holding the supported blocks).
        plan: ``grace.plan/v1`` path, JSON string, dict or plan object; one layer per MoE block, the model's E.
        group: torch.distributed process group (None: the default group, or a world of one without
            torch.distributed); rank r of the group holds ``gpu_experts[r]`` of every layer.
        topology, scheme, policy, seed, timeout: passed to ``grace.ep.Buffer``.
        share_workspace: passed to ``grace.ep.Buffer`` (default True: on CUDA the blocks, which run one after another
            through ``Buffer.moe``, share one set of device scratch buffers instead of one per block).
        check_ids: passed to ``grace.ep.Buffer`` (default False: the ids are the block's own router's top-k over its
            E logits, so on one GPU ``moe`` needs no host wait for their range check).
        buffer_factory: ``f(group, plan_dict, layer, **kwargs) -> buffer`` instead of ``grace.ep.Buffer``.
    Raises:
        PatchError (ValueError): no supported block, the plan's layer or expert count differs from the model's, an
        experts module whose output the SwiGLU weights do not reproduce, or a model already patched. Nothing is
        replaced when it raises.
    """
    if torch is None:
        raise ImportError("grace.hf needs PyTorch")
    if getattr(model, _PATCHES_ATTR, None):
        raise PatchError(f"{type(model).__name__} is already patched by grace.hf (call grace.hf.unpatch first)")
    blocks = moe_blocks(model)
    if not blocks:
        raise PatchError(f"{type(model).__name__} has no MoE block grace.hf supports (looked for "
                         f"{sorted(HF_MOE_BLOCKS)})")
    pd = _plan_dict(plan)
    layers = pd.get("layers") or []
    if not isinstance(layers, list):  # checked here: len() of it raised a bare TypeError
        raise PatchError(f"plan: 'layers' must be a list, got {type(layers).__name__}")
    e_given = pd.get("num_experts")
    if e_given is not None and (isinstance(e_given, bool) or not isinstance(e_given, int)):
        raise PatchError(f"plan: 'num_experts' must be an integer, got {e_given!r}")
    if len(layers) != len(blocks):
        raise PatchError(f"plan has {len(layers)} layers but {type(model).__name__} has {len(blocks)} MoE blocks "
                         "(plan layer l is the l-th MoE block)")
    rank = _group_rank(group)
    config = getattr(model, "config", None)
    factory = buffer_factory or _default_buffer_factory
    bkw = dict(topology=topology, scheme=scheme, policy=policy, seed=seed, timeout=timeout,
               share_workspace=share_workspace, check_ids=check_ids)

    # Check everything before replacing anything.
    prepared = []
    for layer, (name, block, family) in enumerate(blocks):
        experts = getattr(block, "experts", None)
        if experts is None:
            raise PatchError(f"{name} ({type(block).__name__}): no experts submodule")
        layout = _expert_layout(name, experts)
        e_plan = int(pd.get("num_experts", layout.num_experts))
        if e_plan != layout.num_experts:
            raise PatchError(f"plan is for {e_plan} experts but {name} has {layout.num_experts}")
        gpu_experts = layers[layer].get("gpu_experts") or []
        if rank >= len(gpu_experts):
            raise PatchError(f"plan layer {layer} has {len(gpu_experts)} GPUs; this is rank {rank}")
        _probe(name, experts, layout)
        legacy = layout.kind == "list"
        if legacy and family == "gpt_oss":
            raise PatchError(f"{name}: GPT-OSS with a ModuleList of experts is not a transformers layout")
        prepared.append((layer, name, block, family, experts, layout, [int(i) for i in gpu_experts[rank]], legacy))

    patches = []
    for layer, name, block, family, experts, layout, local_ids, legacy in prepared:
        buf = factory(group, pd, layer, **bkw)
        tensors = _expert_tensors(experts, layout, local_ids)
        if legacy:
            top_k = int(_cfg(block, "top_k", default=0) or _cfg(getattr(block, "gate", None), "top_k", default=0)
                        or _cfg(config, "num_experts_per_tok", default=0))
            with torch.no_grad():  # what does the original block return? one token tells
                p = next(iter(block.parameters()))
                out = block(torch.zeros(1, 1, layout.hidden, dtype=p.dtype, device=p.device))
            new = GraceMoeBlock(block, family, config, buf, tensors, top_k, isinstance(out, (tuple, list)))
            parent, attr = _parent(model, name)
            patches.append((parent, attr, block))
            setattr(parent, attr, new)
        else:
            new = GraceExperts(buf, tensors, layout.kind, float(getattr(experts, "alpha", 1.702)),
                               float(getattr(experts, "limit", 7.0)), layout.num_experts)
            patches.append((block, "experts", experts))
            block.experts = new
    setattr(model, _PATCHES_ATTR, patches)
    return model


def unpatch(model):
    """Puts the original modules back (the model computes as before ``patch``); returns ``model``. No-op on a model
    that is not patched."""
    for parent, attr, original in reversed(getattr(model, _PATCHES_ATTR, None) or []):
        setattr(parent, attr, original)
    if hasattr(model, _PATCHES_ATTR):
        delattr(model, _PATCHES_ATTR)
    return model


def is_patched(model) -> bool:
    return bool(getattr(model, _PATCHES_ATTR, None))
