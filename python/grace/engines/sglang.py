"""GRACE routing inside SGLang: replaces SGLang's logical -> physical expert mapping with TAR / WRR.

Written against sgl-project/sglang commit 68836b60f99d117ec96b5c8d7e49400724f25aca,
``python/sglang/srt/eplb/expert_location_dispatch.py``: the MoE top-k step calls
``topk_ids_logical_to_physical(topk_ids, info)`` with the ``ExpertLocationDispatchInfo`` of the layer
(``ExpertLocationDispatchInfo.init_new(layer_id)``), which for ``--ep-dispatch-algorithm static`` returns
``info.partial_logical_to_rank_dispatch_physical_map[topk_ids]``. The hook

* wraps ``ExpertLocationDispatchInfo.init_new`` so each info carries its decoder-layer index (``grace_layer``), and
* replaces ``topk_ids_logical_to_physical`` (in ``expert_location_dispatch`` and in every loaded SGLang module that
  imported it by name, e.g. ``sglang.srt.layers.moe.topk``) with ``TableRouter.route`` for this process's EP rank.

Layers the plan does not cover (dense layers, an info without a layer) keep SGLang's own mapping. Usage, before the
model runs (e.g. in a custom launcher that then calls ``sglang.launch_server``'s entry point in each process):

    from grace.engines import sglang as grace_sglang
    grace_sglang.install(json.load(open("plan.json")), layer_offset=0)

The placement must be the one the plan was exported to (``--init-expert-location out/sglang.json``).
"""

import sys

from .routing import RankRouter, moe_layer_map, torch, _require_torch
import grace


def make_logical_to_physical(rank_router, moe_layer_of, fallback):
    """The replacement of ``topk_ids_logical_to_physical``: routes the layers in ``moe_layer_of`` (decoder index ->
    MoE layer of the plan) with ``rank_router`` (a RankRouter), the others with ``fallback`` (SGLang's own)."""

    def topk_ids_logical_to_physical(topk_ids, info, *args, **kwargs):
        if info is None:
            return topk_ids
        moe_layer = moe_layer_of.get(getattr(info, "grace_layer", None))
        if moe_layer is None:
            return fallback(topk_ids, info, *args, **kwargs)
        router = rank_router.get()
        if info.num_physical_experts != router.num_physical:
            raise grace.GraceError(f"SGLang has {info.num_physical_experts} physical experts but the GRACE map has "
                                   f"{router.num_physical}: pass --ep-num-redundant-experts P - E from grace export")
        return router.route(moe_layer, topk_ids, rank_router.rank)

    topk_ids_logical_to_physical.grace_router = rank_router
    return topk_ids_logical_to_physical


class Installed:
    """What ``install`` changed: ``router`` (the RankRouter; ``router.get().offsets`` are the counters) and
    ``uninstall()``, which puts SGLang's functions back."""

    def __init__(self, router, patched, dispatch_cls, init_new):
        self.router = router
        self._patched, self._cls, self._init_new = patched, dispatch_cls, init_new

    def uninstall(self):
        for module, name, original in self._patched:
            setattr(module, name, original)
        self._cls.init_new = self._init_new


def install(plan, rank=None, policy=None, layer_offset=0, moe_layers=None, phy2log=None, expert_load=None,
            device=None):
    """Installs GRACE routing into SGLang in this process. rank: this process's EP rank (default
    ``torch.distributed.get_rank() % G``, SGLang's own rule, read when the tables are built: now if the process
    group is up, else at the first MoE layer); layer_offset / moe_layers: decoder index of MoE layer 0 / of every
    MoE layer; device: default the current CUDA device. Returns an ``Installed``."""
    _require_torch()
    import sglang.srt.eplb.expert_location_dispatch as dispatch

    router = RankRouter(plan, rank=rank, policy=policy, phy2log=phy2log, expert_load=expert_load, device=device)
    moe_layer_of = moe_layer_map(router.num_layers, layer_offset, moe_layers)

    original = dispatch.topk_ids_logical_to_physical
    replacement = make_logical_to_physical(router, moe_layer_of, original)
    patched = []
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "") or ""
        if (name == dispatch.__name__ or name.startswith("sglang.")) and \
                getattr(module, "topk_ids_logical_to_physical", None) is original:
            patched.append((module, "topk_ids_logical_to_physical", original))
            setattr(module, "topk_ids_logical_to_physical", replacement)

    cls = dispatch.ExpertLocationDispatchInfo
    init_new = cls.__dict__["init_new"]

    def init_new_with_layer(klass, layer_id, *args, **kwargs):
        info = init_new.__func__(klass, layer_id, *args, **kwargs)
        if info is not None:
            info.grace_layer = layer_id
        return info

    cls.init_new = classmethod(init_new_with_layer)
    return Installed(router, patched, cls, init_new)
