"""Device-side GRACE replica routing with torch ops: the picks of ``grace.ReplicaRouter`` (WRR / TAR).

The C++ router (include/grace/routing.hpp) keeps, per (source GPU, expert), a pick sequence of length Q over the
expert's instances and a counter: the i-th selection of that pair takes position (offset + i) mod Q. Here a whole
batch is routed at once: the selections of a batch, flattened in token order ([T, k] -> [T*k]), are grouped by
(source, expert) with a stable sort, which gives each selection its i (how many earlier selections of the same
pair the batch holds); the sequence table gives the instance, the slot table its physical slot, and the counters
advance by each pair's count. Every step is a tensor op on the device the tables live on; nothing is read back to
the host, so the hook can run inside CUDA graphs and torch.compile'd regions of the engines.

Physical slots follow the exports (docs/formats.md, "Exports"): slot p = g * S + i is the i-th expert of GPU g in
the physical map ``phy2log`` [L, G * S] (``grace.physical_map`` of the plan, or the array the engine loaded).
Padding slots of a padded export hold replicas no planning step chose; this router never picks them.
"""

import grace

try:
    import torch
except ImportError:  # the module stays importable; TableRouter raises with the reason
    torch = None


def _require_torch():
    if torch is None:
        raise ImportError("grace.engines needs PyTorch (pip install torch, or Debian's python3-torch)")


def moe_layer_map(num_layers, layer_offset=0, moe_layers=None):
    """{decoder-layer index: MoE layer of the plan}: MoE layer l is decoder layer layer_offset + l, or
    moe_layers[l] when given (models whose MoE layers are not consecutive)."""
    if moe_layers is None:
        moe_layers = range(layer_offset, layer_offset + num_layers)
    moe_layers = [int(x) for x in moe_layers]
    if len(moe_layers) != num_layers:
        raise grace.GraceError(f"moe_layers lists {len(moe_layers)} layers but the plan has {num_layers}")
    return {decoder: l for l, decoder in enumerate(moe_layers)}


class TableRouter:
    """GRACE routing tables of one plan as torch tensors, with the WRR counters they advance.

    plan: a grace.plan/v1 dict (or JSON text); policy: "tar" or "wrr" (default: each layer's own policy, which
    must be one of them); ranks: the source GPUs (EP ranks) whose tables to keep (default all; an engine process
    needs only its own rank, E * Q bytes per layer); phy2log: [L, G * S] physical map the engine loaded (default
    ``grace.physical_map(plan, expert_load)``); device: where the tables live.

    Tensors: ``sequences`` uint8 [L, R, E, Q] (R = len(ranks)), ``slots`` int64 [L, E, X] (physical slot of each
    instance, -1 padded), ``offsets`` int64 [L, R, E] (the counters). Raises grace.GraceError for a plan whose
    policy has no sequences or a physical map that lacks a planned instance.
    """

    def __init__(self, plan, policy=None, ranks=None, phy2log=None, expert_load=None, device="cpu"):
        _require_torch()
        import numpy as np

        plan = grace.validate_plan(plan)
        self.num_layers = int(plan["num_layers"])
        self.num_experts = E = int(plan["num_experts"])
        topo = plan["topology"]
        self.num_gpus = G = int(topo["nodes"]) * int(topo["gpus_per_node"])
        self.ranks = list(range(G)) if ranks is None else [int(r) for r in ranks]
        for r in self.ranks:
            if not 0 <= r < G:
                raise grace.GraceError(f"rank {r} is outside [0, {G}) of the plan's topology")
        if len(set(self.ranks)) != len(self.ranks):
            raise grace.GraceError(f"ranks {self.ranks} repeat a rank")
        if phy2log is None:
            phy2log = grace.physical_map(plan, expert_load)["phy2log"]
        phy2log = np.asarray(phy2log)
        if phy2log.ndim != 2 or phy2log.shape[0] != self.num_layers or phy2log.shape[1] % G != 0:
            raise grace.GraceError(f"phy2log must have shape [L={self.num_layers}, G*S] with G={G}, got "
                                   f"{list(phy2log.shape)}")
        self.num_physical = P = int(phy2log.shape[1])
        self.slots_per_gpu = S = P // G

        seqs, slot_rows, policies, period = [], [], [], None
        max_inst = max(len(inst) for lay in plan["layers"] for inst in lay["routing"]["instances"])
        for l, lay in enumerate(plan["layers"]):
            router = grace.ReplicaRouter(plan, l, policy)
            if router.policy not in ("tar", "wrr"):
                raise grace.GraceError(f"layer {l}: policy {router.policy} has no pick sequences (use tar or wrr)")
            if period is not None and router.period != period:
                raise grace.GraceError(f"layer {l}: WRR period {router.period} differs from layer 0's {period}")
            period = router.period
            policies.append(router.policy)
            seqs.append(router.flat_sequences()[self.ranks])  # [R, E, Q]
            slot = np.full((E, max_inst), -1, dtype=np.int64)
            for e, gpus in enumerate(lay["routing"]["instances"]):
                for j, g in enumerate(gpus):
                    local = np.nonzero(phy2log[l, g * S:(g + 1) * S] == e)[0]
                    if local.size == 0:
                        raise grace.GraceError(f"layer {l}: the physical map has no slot of expert {e} on GPU {g}, "
                                               "where the plan places an instance (a map of another plan?)")
                    slot[e, j] = g * S + int(local[0])
            slot_rows.append(slot)
        self.period = Q = int(period)
        self.policies = policies
        self.device = torch.device(device)
        self.sequences = torch.from_numpy(np.stack(seqs)).to(self.device)  # uint8 [L, R, E, Q]
        self.slots = torch.from_numpy(np.stack(slot_rows)).to(self.device)  # int64 [L, E, X]
        self.offsets = torch.zeros((self.num_layers, len(self.ranks), E), dtype=torch.int64, device=self.device)
        row_of = np.full(G, -1, dtype=np.int64)
        row_of[self.ranks] = np.arange(len(self.ranks))
        self._row_of = torch.from_numpy(row_of).to(self.device)
        self._max_inst = max_inst
        self._q = Q

    def reset(self):
        """Sets every counter back to zero."""
        self.offsets.zero_()

    def route(self, layer, topk_ids, source, valid_tokens=None):
        """Physical slot ids for logical ids ``topk_ids`` [T, k] (any integer dtype, same dtype out).

        source: the source GPU of every token, an int (an engine process: its own EP rank) or an integer tensor
        [T]; it must be one of ``ranks``. valid_tokens (int or 0-d tensor, optional): only tokens t < valid_tokens
        advance the counters (CUDA-graph padding rows still get a slot but leave the state alone). Ids must lie in
        [0, E): they are not checked, since a check would synchronize with the host.
        """
        if topk_ids.dim() != 2:
            raise grace.GraceError(f"topk_ids must be [T, k], got shape {list(topk_ids.shape)}")
        if not 0 <= layer < self.num_layers:
            raise grace.GraceError(f"layer {layer} is outside [0, {self.num_layers})")
        T, k = topk_ids.shape
        E, Q, dev = self.num_experts, self._q, self.device
        ids = topk_ids.reshape(-1).to(device=dev, dtype=torch.int64)
        n = ids.numel()
        if not torch.is_tensor(source):
            source = int(source)
            if source not in self.ranks:
                raise grace.GraceError(f"source rank {source} has no tables here (ranks {self.ranks})")
            key = ids + self.ranks.index(source) * E
        else:
            rows = self._row_of[source.to(device=dev, dtype=torch.int64)]
            key = rows.view(T, 1).expand(T, k).reshape(-1) * E + ids  # expand, not repeat_interleave: no sync
        num_keys = len(self.ranks) * E
        # Selections that must not count go to an extra bucket past the last (rank, expert) pair.
        counted = key
        if valid_tokens is not None:
            flat_pos = torch.arange(n, device=dev)
            counted = torch.where(flat_pos < valid_tokens * k, key, torch.full_like(key, num_keys))
        counts = torch.zeros(num_keys + 1, dtype=torch.int64, device=dev)
        counts.index_add_(0, counted, torch.ones_like(counted))
        # i of each selection: its rank among the selections of its pair, in token order (stable sort).
        sorted_key, order = torch.sort(counted, stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank_in_pair = torch.empty_like(order)
        rank_in_pair.scatter_(0, order, torch.arange(n, device=dev) - first[sorted_key])
        offsets = self.offsets[layer].view(-1)
        pos = (offsets[key] + rank_in_pair) % Q
        instance = self.sequences[layer].reshape(-1)[key * Q + pos].to(torch.int64)
        physical = self.slots[layer].reshape(-1)[ids * self._max_inst + instance]
        offsets.add_(counts[:num_keys]).remainder_(Q)
        return physical.view(T, k).to(topk_ids.dtype)


class RankRouter:
    """The TableRouter of one engine process: the tables of its EP rank only, built now if the rank is known
    (given, or torch.distributed is initialized), else on first use, so that ``install`` can run before the
    engine sets up its process group. rank default: ``torch.distributed.get_rank() % G``; device default: the
    current CUDA device, else the CPU. Other arguments as TableRouter."""

    def __init__(self, plan, rank=None, policy=None, phy2log=None, expert_load=None, device=None):
        _require_torch()
        self.plan = grace.validate_plan(plan)
        topo = self.plan["topology"]
        self.num_gpus = int(topo["nodes"]) * int(topo["gpus_per_node"])
        self.num_layers = int(self.plan["num_layers"])
        self.rank = rank
        self._args = dict(policy=policy, phy2log=phy2log, expert_load=expert_load)
        self._device = device
        self._router = None
        if rank is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            self.get()

    def get(self):
        """The TableRouter (built on the first call)."""
        if self._router is None:
            if self.rank is None:
                self.rank = torch.distributed.get_rank() % self.num_gpus
            device = self._device
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            self._router = TableRouter(self.plan, ranks=[self.rank], device=device, **self._args)
        return self._router
