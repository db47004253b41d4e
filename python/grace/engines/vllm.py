"""GRACE routing inside vLLM: replaces the EPLB logical -> physical step of vLLM's fused-MoE router.

Written against vllm-project/vllm commit 03919875d63dee772b22935326c8ad468683e43e,
``vllm/model_executor/layers/fused_moe/router/base_router.py``: ``BaseRouter.select_experts`` calls
``self._apply_eplb_mapping(topk_ids)``, which with EPLB on calls ``eplb_map_to_physical_and_record`` (replica
``flat position mod replica count`` of ``eplb_state.logical_to_physical_map``, and the load count into
``eplb_state.expert_load_view`` when ``should_record_tensor`` is set). The hook replaces
``BaseRouter._apply_eplb_mapping``: routers tagged by ``attach`` get ``TableRouter.route`` for this process's EP
rank (padding rows past the forward context's ``num_unpadded_tokens`` do not advance the counters) and the same
load recording, without host synchronization; other routers keep vLLM's method.

vLLM has no flag to load a placement: the GRACE placement must be written into its EPLB state first (docs/deploy.md,
"vLLM"). Usage, once the model is built, in every worker:

    from grace.engines import vllm as grace_vllm
    hook = grace_vllm.install(plan, rank=get_ep_group().rank_in_group, layer_offset=0)
    hook.attach(model)      # tags the FusedMoE routers with their MoE layer (by the "layers.N." in their names)
"""

import re

from .routing import RankRouter, moe_layer_map, torch, _require_torch
import grace

_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def make_apply_eplb_mapping(rank_router, fallback, num_unpadded=lambda: None):
    """The replacement of ``BaseRouter._apply_eplb_mapping``: routers tagged with ``grace_layer`` (and EPLB on)
    go through ``rank_router`` (a RankRouter), the others through ``fallback`` (vLLM's method)."""

    def _apply_eplb_mapping(self, topk_ids):
        moe_layer = getattr(self, "grace_layer", None)
        if moe_layer is None or not self.enable_eplb:
            return fallback(self, topk_ids)
        router = rank_router.get()
        state = self.eplb_state
        if state.expert_load_view.shape[0] != router.num_physical:
            raise grace.GraceError(f"vLLM has {state.expert_load_view.shape[0]} physical experts but the GRACE map "
                                   f"has {router.num_physical}: set num_redundant_experts to P - E from grace export")
        physical = router.route(moe_layer, topk_ids, rank_router.rank, valid_tokens=num_unpadded())
        # vLLM's load recording, gated by its record flag (a device tensor: no host read).
        flat = physical.reshape(-1).to(torch.int64)
        record = state.should_record_tensor if getattr(state, "should_record_tensor", None) is not None else 1
        state.expert_load_view.index_add_(
            0, flat, (torch.ones_like(flat) * record).to(state.expert_load_view.dtype))
        return physical

    _apply_eplb_mapping.grace_router = rank_router
    return _apply_eplb_mapping


class Installed:
    """What ``install`` changed: ``router`` (the RankRouter), ``attach(model)`` to tag the model's routers and
    ``uninstall()`` to restore vLLM's method."""

    def __init__(self, router, moe_layer_of, cls, original):
        self.router = router
        self._moe_layer_of, self._cls, self._original = moe_layer_of, cls, original

    def attach(self, model):
        """Tags every module's ``router`` that has ``_apply_eplb_mapping`` with its MoE layer, read from the
        module's name (``...layers.N...``: decoder layer N). Returns the number tagged; raises grace.GraceError if
        none is found."""
        tagged = 0
        for name, module in model.named_modules():
            r = getattr(module, "router", None)
            m = _LAYER_IN_NAME.search(name)
            if r is None or not hasattr(r, "_apply_eplb_mapping") or m is None:
                continue
            moe_layer = self._moe_layer_of.get(int(m.group(1)))
            if moe_layer is not None:
                r.grace_layer = moe_layer
                tagged += 1
        if tagged == 0:
            raise grace.GraceError("no fused-MoE router with a 'layers.N.' name found in the model")
        return tagged

    def uninstall(self):
        self._cls._apply_eplb_mapping = self._original


def _num_unpadded_tokens():
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    if not is_forward_context_available():
        return None
    n = getattr(get_forward_context(), "num_unpadded_tokens", None)
    return None if isinstance(n, int) and n < 0 else n  # vLLM's -1: no padding information


def install(plan, rank=None, policy=None, layer_offset=0, moe_layers=None, phy2log=None, expert_load=None,
            device=None):
    """Installs GRACE routing into vLLM's BaseRouter in this process; arguments as grace.engines.sglang.install
    (rank default ``torch.distributed.get_rank() % G``). Returns an ``Installed``; call its ``attach(model)``."""
    _require_torch()
    from vllm.model_executor.layers.fused_moe.router import base_router

    router = RankRouter(plan, rank=rank, policy=policy, phy2log=phy2log, expert_load=expert_load, device=device)
    moe_layer_of = moe_layer_map(router.num_layers, layer_offset, moe_layers)
    cls = base_router.BaseRouter
    original = cls._apply_eplb_mapping
    cls._apply_eplb_mapping = make_apply_eplb_mapping(router, original, _num_unpadded_tokens)
    return Installed(router, moe_layer_of, cls, original)
