"""Routing recorder for Hugging Face transformers MoE models (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral,
DeepSeek-V2, DeepSeek-V3).

Forward hooks on every MoE block capture, for every token the model runs, the top-k routed expert ids and
their gate weights, and write them as a GRACE trace (``grace.trace/v1``: int32 [T, L, k] + metadata + float32
weights). Tokens whose attention mask is 0 (padding) are not recorded; shared experts (Qwen2-MoE's
``shared_expert``, DeepSeek's ``shared_experts``) are not routed and are never recorded; dense layers
(DeepSeek's ``first_k_dense_replace``, Qwen's ``mlp_only_layers``) are not MoE layers, so L counts MoE blocks.

Where the ids come from, per MoE block (first that applies):

1. the router/gate module's output, when it returns ``(logits, weights, indices)`` (transformers 5.x
   ``*TopKRouter`` of OLMoE, Qwen2/3-MoE and Mixtral);
2. otherwise the ``(hidden_states, top_k_index, top_k_weights)`` the block hands its fused experts module
   (transformers 5.x DeepSeek-V2/V3, whose gate returns only logits and whose group-limited selection runs
   in the block) - exactly the ids the experts computed with;
3. otherwise the gate's logits (older transformers, where ``gate`` is an ``nn.Linear``), routed here with the
   model family's rule: softmax top-k (optionally renormalised) or DeepSeek's group-limited selection
   (``noaux_tc`` for V3: sigmoid + ``e_score_correction_bias``, groups scored by their top-2 sum;
   ``group_limited_greedy`` for V2: softmax, groups scored by their max; ``greedy``).

Ids are stored in rank order: descending gate weight (ties: lower position first), since DeepSeek selects
with ``sorted=False``.

Usage::

    from grace.recorder import RoutingRecorder
    rec = RoutingRecorder(model)                       # raises NoMoEBlockError for a dense model
    rec.record_texts(texts, tokenizer, batch_size=8, max_length=512)   # or rec.record_batches(batches)
    rec.save("out/olmoe.npy", model_name="allenai/OLMoE-1B-7B-0924", dataset="wikitext-2")
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from .tracefile import write_trace

try:  # torch is only needed to record; importing this module without it must still work (docs, CI).
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised on machines without torch
    torch = None
    F = None


class NoMoEBlockError(ValueError):
    """The model contains no MoE block this recorder recognises."""


# Class name -> routing family. The family only matters when ids must be computed from logits (path 3).
MOE_BLOCK_CLASSES = {
    "OlmoeSparseMoeBlock": "softmax",
    "Qwen2MoeSparseMoeBlock": "softmax",
    "Qwen3MoeSparseMoeBlock": "softmax",
    "MixtralSparseMoeBlock": "softmax_renorm",
    "DeepseekV2Moe": "deepseek_v2",
    "DeepseekV2MoE": "deepseek_v2",
    "DeepseekV3MoE": "deepseek_v3",
}


def _cfg(obj, *names, default=None):
    for n in names:
        if obj is not None and getattr(obj, n, None) is not None:
            return getattr(obj, n)
    return default


def route_from_logits(logits, family: str, top_k: int, *, norm_topk_prob: bool = False, n_group=None,
                      topk_group=None, topk_method: str = "greedy", correction_bias=None,
                      routed_scaling_factor: float = 1.0):
    """Top-k selection from router logits [N, E] as the model family's router does it.

    Returns (ids [N, k] int64, weights [N, k] float32). ``family``: softmax | softmax_renorm | deepseek_v2 |
    deepseek_v3. DeepSeek group-limited selection uses n_group/topk_group.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    n, e = logits.shape
    if family in ("softmax", "softmax_renorm"):
        probs = torch.softmax(logits, dim=-1)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if family == "softmax_renorm" or norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w
    if family == "deepseek_v3":
        scores = logits.sigmoid()
        choice = scores + (correction_bias.float() if correction_bias is not None else 0.0)
        if n_group and n_group > 1 and topk_group and topk_group < n_group:
            grp = choice.view(n, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
            gidx = torch.topk(grp, k=topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(grp).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
            choice = choice.masked_fill(~smask.bool(), 0.0)
        idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * routed_scaling_factor
    if family == "deepseek_v2":
        probs = torch.softmax(logits, dim=-1)
        if topk_method == "group_limited_greedy" and n_group and topk_group:
            grp = probs.view(n, n_group, e // n_group).max(dim=-1).values
            gidx = torch.topk(grp, k=topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(grp).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
            probs = probs.masked_fill(~smask.bool(), 0.0)
        w, idx = torch.topk(probs, k=top_k, dim=-1, sorted=False)
        if norm_topk_prob and top_k > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * routed_scaling_factor
    raise ValueError(f"unknown routing family {family!r}")


def routing_kwargs(module, config) -> dict:
    """The keyword arguments of ``route_from_logits`` for one MoE block: its own attributes first, then the model
    config's (norm_topk_prob, DeepSeek's n_group/topk_group/topk_method, the gate's e_score_correction_bias and
    routed_scaling_factor). Shared by the recorder and ``grace.hf``."""
    m, c, gate = module, config, getattr(module, "gate", None)
    return dict(
        norm_topk_prob=bool(_cfg(m, "norm_topk_prob", default=None) if _cfg(m, "norm_topk_prob") is not None
                            else _cfg(c, "norm_topk_prob", default=False)),
        n_group=_cfg(m, "n_group", "num_group", default=None) or _cfg(c, "n_group"),
        topk_group=_cfg(m, "topk_group", default=None) or _cfg(c, "topk_group"),
        topk_method=_cfg(m, "topk_method", default=None) or _cfg(c, "topk_method", default="greedy"),
        correction_bias=_cfg(gate, "e_score_correction_bias"),
        routed_scaling_factor=float(_cfg(m, "routed_scaling_factor", default=None)
                                    or _cfg(c, "routed_scaling_factor", default=1.0)))


def selection_from_router_output(out):
    """(ids [N, k], weights [N, k] or None) when a router/gate output carries its own selection (a tuple with an
    integer tensor: ``(logits, weights, ids)`` in transformers 5.x, ``(ids, weights)`` in 4.x DeepSeek-V3);
    None when it is logits only."""
    if not isinstance(out, (tuple, list)):
        return None
    ints = [x for x in out if torch.is_tensor(x) and not torch.is_floating_point(x) and x.dim() >= 1]
    if not ints:
        return None
    idx = ints[0].reshape(-1, ints[0].shape[-1])
    ws = [x for x in out if torch.is_tensor(x) and torch.is_floating_point(x) and x.numel() == idx.numel()]
    return idx, (ws[0].reshape(idx.shape) if ws else None)


class _Block:
    """Hooks and per-call scratch of one MoE block."""

    def __init__(self, name, module, family, layer_index, config):
        self.name = name
        self.module = module
        self.family = family
        self.layer_index = layer_index
        self.config = config
        self.gate_out = None
        self.expert_in = None
        self.hidden_in = None
        self.source = None  # which path produced the ids: "router" | "experts" | "logits"
        self.ids = []       # per batch: np.int32 [n, k]
        self.weights = []   # per batch: np.float32 [n, k]
        self.handles = []

    def num_experts(self):
        gate = getattr(self.module, "gate", None)
        return int(_cfg(self.module, "num_experts", "n_routed_experts", default=0)
                   or _cfg(gate, "num_experts", "n_routed_experts", default=0)
                   or _cfg(getattr(gate, "weight", None), "shape", default=(0,))[0]
                   or _cfg(self.config, "num_experts", "num_local_experts", "n_routed_experts", default=0))

    def top_k(self):
        gate = getattr(self.module, "gate", None)
        return int(_cfg(self.module, "top_k", default=0) or _cfg(gate, "top_k", default=0)
                   or _cfg(self.config, "num_experts_per_tok", default=0))


class RoutingRecorder:
    """Records routed top-k expert ids and gate weights of every MoE block of a transformers model.

    Args:
        model: a transformers model (``*ForCausalLM`` or base model) with MoE blocks.
        record_weights: also keep the gate weights (written as ``NAME.weights.npy``).
    Raises:
        NoMoEBlockError: the model has no recognised MoE block (names the classes it looked for).
    """

    def __init__(self, model, record_weights: bool = True):
        if torch is None:
            raise ImportError("grace.recorder needs PyTorch (pip install torch transformers)")
        self.model = model
        self.record_weights = record_weights
        self.config = getattr(model, "config", None)
        self._mask = None
        self._blocks: list[_Block] = []
        for name, mod in model.named_modules():
            family = MOE_BLOCK_CLASSES.get(type(mod).__name__)
            if family is None:
                continue
            m = re.search(r"layers\.(\d+)\.", name + ".")
            self._blocks.append(_Block(name, mod, family, int(m.group(1)) if m else len(self._blocks), self.config))
        if not self._blocks:
            raise NoMoEBlockError(
                f"{type(model).__name__} has no recognised MoE block (looked for {sorted(MOE_BLOCK_CLASSES)}); "
                "a dense model has no routing to record")
        self._attach()

    # --- hooks -------------------------------------------------------------------------------------------------
    def _attach(self):
        for b in self._blocks:
            gate = getattr(b.module, "gate", None)
            experts = getattr(b.module, "experts", None)
            if isinstance(gate, torch.nn.Module):
                b.handles.append(gate.register_forward_hook(self._gate_hook(b)))
            if isinstance(experts, torch.nn.Module) and not isinstance(experts, torch.nn.ModuleList):
                try:
                    b.handles.append(experts.register_forward_pre_hook(self._experts_hook(b), with_kwargs=True))
                except TypeError:  # torch < 2.0: positional arguments only
                    hook = self._experts_hook(b)
                    b.handles.append(experts.register_forward_pre_hook(lambda m, a, h=hook: h(m, a, {})))
            b.handles.append(b.module.register_forward_pre_hook(self._block_pre_hook(b)))
            b.handles.append(b.module.register_forward_hook(self._block_hook(b)))

    def remove(self):
        """Removes every hook; the model runs as before."""
        for b in self._blocks:
            for h in b.handles:
                h.remove()
            b.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @staticmethod
    def _gate_hook(b):
        def hook(_mod, _inp, out):
            b.gate_out = out
        return hook

    @staticmethod
    def _experts_hook(b):
        def hook(_mod, args, kwargs):
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            w = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if idx is not None and torch.is_tensor(idx) and not torch.is_floating_point(idx):
                b.expert_in = (idx, w)
        return hook

    @staticmethod
    def _block_pre_hook(b):
        def hook(_mod, args):
            b.gate_out = None
            b.expert_in = None
            b.hidden_in = args[0] if args else None
        return hook

    def _block_hook(self, b):
        def hook(_mod, _inp, _out):
            idx, w = self._resolve(b)
            b.gate_out = b.expert_in = b.hidden_in = None
            n_rows = idx.shape[0]
            if self._mask is not None:
                mask = self._mask
                if mask.numel() != n_rows:
                    raise RuntimeError(f"{b.name}: {n_rows} routed rows but the attention mask has {mask.numel()} "
                                       "positions; the recorder needs one routing row per input position")
                keep = mask.reshape(-1).to(idx.device).bool()
                idx = idx[keep]
                w = w[keep] if w is not None else None
            if w is not None:
                # rank order: descending weight, stable (DeepSeek's top-k is unsorted)
                order = torch.sort(w.float(), dim=-1, descending=True, stable=True).indices
                idx = idx.gather(1, order)
                w = w.float().gather(1, order)
            b.ids.append(idx.to(torch.int32).cpu().numpy())
            if self.record_weights and w is not None:
                b.weights.append(w.float().cpu().numpy())
        return hook

    def _resolve(self, b):
        out = b.gate_out
        sel = selection_from_router_output(out)  # a router that returns its selection
        if sel is not None:
            b.source = "router"
            return sel
        if b.expert_in is not None:
            idx, w = b.expert_in
            idx = idx.reshape(-1, idx.shape[-1])
            if w is not None:
                w = w.reshape(idx.shape[0], -1)
                if w.shape[1] != idx.shape[1]:  # dense [N, E] weights (a DeepSeek-V2 variant): pick the k chosen
                    w = w.gather(1, idx.long())
            b.source = "experts"
            return idx, w
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if logits is None and b.family == "deepseek_v2" and b.hidden_in is not None:
            gate = b.module.gate  # transformers 5.x DeepSeek-V2 applies gate.weight without calling gate
            logits = F.linear(b.hidden_in.float().reshape(-1, b.hidden_in.shape[-1]), gate.weight.float())
        if logits is None or not torch.is_tensor(logits):
            raise RuntimeError(f"{b.name} ({type(b.module).__name__}): could not capture its routing "
                               "(no router indices, experts input or gate logits)")
        b.source = "logits"
        return route_from_logits(logits, b.family, b.top_k(), **routing_kwargs(b.module, self.config))

    # --- running ------------------------------------------------------------------------------------------------
    def record_batch(self, input_ids, attention_mask=None, **model_kwargs):
        """Runs one forward pass (no grad, no KV cache) and records its non-pad tokens. Returns the output."""
        dev = next(self.model.parameters()).device
        input_ids = torch.as_tensor(input_ids).to(dev)
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(dev)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}")
        self._mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        try:
            with torch.no_grad():
                return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **model_kwargs)
        finally:
            self._mask = None

    def record_batches(self, batches: Iterable, max_tokens: int | None = None):
        """Records pre-tokenized batches: each a dict with ``input_ids`` (and ``attention_mask``), or a pair
        (input_ids, attention_mask), or a bare input_ids array. Stops once ``max_tokens`` tokens are recorded."""
        for batch in batches:
            if isinstance(batch, dict) or hasattr(batch, "keys"):
                ids, mask = batch["input_ids"], batch.get("attention_mask")
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                ids, mask = batch
            else:
                ids, mask = batch, None
            self.record_batch(ids, mask)
            if max_tokens is not None and self.num_tokens >= max_tokens:
                break

    def record_texts(self, texts: Iterable[str], tokenizer, batch_size: int = 8, max_length: int = 512,
                     max_tokens: int | None = None):
        """Tokenizes an iterable of strings in padded batches and records them (pad tokens are skipped)."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        def batches():
            buf = []
            for text in texts:
                if not text or not text.strip():
                    continue
                buf.append(text)
                if len(buf) == batch_size:
                    yield tokenizer(buf, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                    buf = []
            if buf:
                yield tokenizer(buf, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.record_batches(batches(), max_tokens=max_tokens)

    # --- results ------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(a.shape[0] for a in self._blocks[0].ids)

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer index of each recorded MoE layer (trace layer l is decoder layer moe_layers[l])."""
        return [b.layer_index for b in self._blocks]

    @property
    def sources(self) -> list:
        """Per MoE layer, where its ids came from: "router", "experts" or "logits" (None before any batch)."""
        return [b.source for b in self._blocks]

    def num_experts(self) -> int:
        return self._blocks[0].num_experts()

    def trace(self):
        """Returns (ids int32 [T, L, k], weights float32 [T, L, k] or None) of everything recorded so far."""
        counts = [sum(a.shape[0] for a in b.ids) for b in self._blocks]
        if counts[0] == 0:
            raise ValueError("nothing recorded yet (run record_batch / record_batches / record_texts first)")
        if len(set(counts)) != 1:
            raise RuntimeError(f"MoE layers recorded different token counts: {counts}")
        ids = np.stack([np.concatenate(b.ids, axis=0) for b in self._blocks], axis=1)
        weights = None
        if self.record_weights and all(b.weights for b in self._blocks):
            weights = np.stack([np.concatenate(b.weights, axis=0) for b in self._blocks], axis=1)
        return ids, weights

    def reset(self):
        for b in self._blocks:
            b.ids.clear()
            b.weights.clear()

    def save(self, path: str, model_name: str = "", dataset: str = "") -> dict:
        """Writes the trace (``path``.npy, .json, .weights.npy); returns the metadata written."""
        ids, weights = self.trace()
        c = self.config
        extra = {"moe_layers": self.moe_layers, "routing_source": self.sources,
                 "architecture": type(self._blocks[0].module).__name__}
        if _cfg(c, "n_group") is not None:
            extra["n_group"] = int(_cfg(c, "n_group"))
            extra["topk_group"] = int(_cfg(c, "topk_group", default=0) or 0)
        return write_trace(path, ids, self.num_experts(), weights,
                           model=model_name or str(_cfg(c, "_name_or_path", "model_type", default="")),
                           dataset=dataset, extra=extra)


def record_trace(model, data, path: str, tokenizer=None, model_name: str = "", dataset: str = "",
                 batch_size: int = 8, max_length: int = 512, max_tokens: int | None = None) -> dict:
    """One call: hooks ``model``, runs it over ``data`` (strings with ``tokenizer``, or pre-tokenized batches),
    writes the trace to ``path`` and removes the hooks. Returns the metadata written."""
    with RoutingRecorder(model) as rec:
        if tokenizer is not None:
            rec.record_texts(data, tokenizer, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
        else:
            rec.record_batches(data, max_tokens=max_tokens)
        return rec.save(path, model_name=model_name, dataset=dataset)
