"""Converters from what serving engines record to GRACE traces and statistics.

* SGLang ``per_token`` expert-distribution dumps (``--expert-distribution-recorder-mode per_token``, then
  ``/dump_expert_distribution_record``): one ``.pt`` file per rank holding
  ``{"records": [{"forward_pass_id", "rank", "input_ids", "positions", "extend_seq_lens", "forward_mode",
  "topk_ids_of_layer": int32 [num_layers, num_tokens, 8] (physical expert ids, -1 = unused), "misc_objects",
  "global_physical_count"}, ...], "last_physical_to_logical_map": int [num_layers, num_physical_experts]}``
  -> a trace. Physical ids are mapped back to logical ids through ``last_physical_to_logical_map``.
* SGLang ``stat`` dumps (mode ``stat``): ``{"rank", "logical_count": int [buffer_steps, num_layers,
  num_logical_experts], "average_utilization_rate_over_window"}`` -> statistics (loads only).
* a vLLM EPLB load window (``EplbModelState.expert_load_window``: int [window, num_moe_layers,
  num_physical_experts], with ``physical_to_logical_map`` [num_moe_layers, num_physical_experts], -1 for unused
  slots) -> statistics (loads only).

Every input can also be given as ``.json`` (the same dict, tensors as nested lists) or ``.npz`` (the same keys
as arrays; for per_token: ``topk_ids_of_layer`` [num_layers, num_tokens, K] of all records concatenated along
tokens, plus ``last_physical_to_logical_map``), so no PyTorch is needed except for ``.pt`` files.

Load-only statistics have an all-zero affinity (the engines count loads, not co-activation); their meta.json
says ``"affinity_known": false``. GRACE's affinity grouping needs a trace (SGLang per_token or the HF recorder).

Command line: ``python3 -m grace.convert --help``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .tracefile import write_stats, write_trace


class ConversionError(ValueError):
    """An engine dump is malformed or inconsistent (e.g. a physical->logical map that does not fit its ids)."""


def _to_numpy(x, name):
    if x is None:
        raise ConversionError(f"missing field {name!r}")
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise ConversionError(f"{name}: ragged or non-numeric data")
    return a


def _load_any(path: str):
    """Loads a dump: .pt (torch), .json, .npz or .npy -> dict (or array for .npy)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path) as f:
            return json.load(f)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext == ".npy":
        return np.load(path, allow_pickle=False)
    if ext in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path}: reading .pt dumps needs PyTorch; convert it to .json/.npz or install torch") from e
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # very old torch without weights_only
            return torch.load(path, map_location="cpu")
    raise ConversionError(f"{path}: unknown dump format {ext!r} (expected .pt, .json, .npz or .npy)")


# --------------------------------------------------------------------------------------------------------------
# SGLang per_token -> trace

def _per_token_records(dump, path):
    if not isinstance(dump, dict):
        raise ConversionError(f"{path}: a per_token dump must be a dict with 'records' and "
                              "'last_physical_to_logical_map'")
    if "last_physical_to_logical_map" not in dump:
        raise ConversionError(f"{path}: missing 'last_physical_to_logical_map' (is this a per_token dump? "
                              f"keys: {sorted(dump)})")
    p2l = _to_numpy(dump["last_physical_to_logical_map"], "last_physical_to_logical_map")
    if "records" in dump:
        recs = []
        for i, r in enumerate(dump["records"]):
            if "topk_ids_of_layer" not in r:
                raise ConversionError(f"{path}: record {i} has no 'topk_ids_of_layer' (keys: {sorted(r)})")
            recs.append((int(r.get("forward_pass_id", i)), int(r.get("rank", 0)),
                         _to_numpy(r["topk_ids_of_layer"], f"records[{i}].topk_ids_of_layer")))
    elif "topk_ids_of_layer" in dump:  # .npz form: all records concatenated
        recs = [(0, int(np.asarray(dump.get("rank", 0))), _to_numpy(dump["topk_ids_of_layer"], "topk_ids_of_layer"))]
    else:
        raise ConversionError(f"{path}: no 'records' (or 'topk_ids_of_layer') in the dump")
    return p2l, recs


def sglang_per_token_to_trace(paths, out_path: str | None = None, num_experts: int | None = None,
                              model: str = "", dataset: str = "", ranks=None, layers=None, dedupe: bool = True):
    """Converts SGLang per_token dumps (one file per rank, or a list of files) to a trace.

    Tokens are ordered by (forward_pass_id, rank, position in the pass). Records of several ranks with identical
    ids for the same forward pass (tensor parallelism: every rank sees every token) are kept once when
    ``dedupe``. ``ranks`` keeps only those ranks. MoE layers are the layers with any recorded id (dense layers
    stay -1) unless ``layers`` lists them. k = the number of leading id columns used.

    Returns (ids int32 [T, L, k], meta dict); writes the trace when ``out_path`` is given.
    Raises ConversionError when a physical id is outside the map, the map sends a used slot to -1 or outside
    [0, E), or a token gets one logical expert twice (the map does not match the ids).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    p2l = None
    records = []
    for path in paths:
        m, recs = _per_token_records(_load_any(str(path)), path)
        if m.ndim != 2:
            raise ConversionError(f"{path}: last_physical_to_logical_map must be [num_layers, num_physical], "
                                  f"got shape {m.shape}")
        if p2l is None:
            p2l = m
        elif m.shape != p2l.shape or not np.array_equal(m, p2l):
            raise ConversionError(f"{path}: its physical->logical map differs from the first file's")
        records += recs
    if not records:
        raise ConversionError("no records in the dump(s)")
    num_layers_map, num_physical = p2l.shape
    if ranks is not None:
        records = [r for r in records if r[1] in set(ranks)]
        if not records:
            raise ConversionError(f"no records of ranks {list(ranks)}")
    records.sort(key=lambda r: (r[0], r[1]))
    kept, seen = [], set()
    for fp, rank, ids in records:
        if ids.ndim != 3:
            raise ConversionError(f"forward pass {fp}, rank {rank}: topk_ids_of_layer must be [L, N, K], "
                                  f"got shape {ids.shape}")
        if ids.shape[0] != num_layers_map:
            raise ConversionError(f"forward pass {fp}, rank {rank}: {ids.shape[0]} layers but the map has "
                                  f"{num_layers_map}")
        key = (fp, ids.shape, ids.tobytes())
        if dedupe and key in seen:
            continue
        seen.add(key)
        kept.append((fp, rank, ids))
    all_ids = np.concatenate([r[2] for r in kept], axis=1).astype(np.int64)  # [Lall, T, K]
    if all_ids.shape[1] == 0:
        raise ConversionError("the dump(s) hold no tokens")
    used = all_ids >= 0
    if layers is None:
        layers = [l for l in range(all_ids.shape[0]) if used[l].any()]
        if not layers:
            raise ConversionError("no layer has any recorded expert id")
    layers = list(layers)
    k = int(used[layers].any(axis=(0, 1)).sum())
    if k == 0 or not used[layers][:, :, :k].any(axis=(0, 1)).all() or used[layers][:, :, k:].any():
        raise ConversionError("recorded ids do not fill leading columns (expected the first k of K columns used)")
    sel = all_ids[layers][:, :, :k]  # [L, T, k]
    if (sel < 0).any():
        l, t, j = np.argwhere(sel < 0)[0]
        raise ConversionError(f"token {t} has no expert id at layer {layers[l]} slot {j} (-1) while others do")
    if (sel >= num_physical).any():
        l, t, j = np.argwhere(sel >= num_physical)[0]
        raise ConversionError(f"physical expert id {sel[l, t, j]} (token {t}, layer {layers[l]}) is outside the "
                              f"map's [0, {num_physical}): the physical->logical map does not match the ids")
    logical = np.take_along_axis(p2l[layers][:, None, :].astype(np.int64),
                                 sel.reshape(len(layers), 1, -1), axis=2).reshape(sel.shape)
    if num_experts is None:
        num_experts = int(p2l.max()) + 1
    bad = (logical < 0) | (logical >= num_experts)
    if bad.any():
        l, t, j = np.argwhere(bad)[0]
        raise ConversionError(f"physical expert {sel[l, t, j]} at layer {layers[l]} maps to logical {logical[l, t, j]}, "
                              f"outside [0, {num_experts}): the physical->logical map does not match the ids")
    if k > 1:
        srt = np.sort(logical, axis=2)
        dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
        if dup.any():
            l, t = np.argwhere(dup)[0]
            raise ConversionError(f"token {t} at layer {layers[l]} selects physical experts {sel[l, t].tolist()} = "
                                  f"logical {logical[l, t].tolist()} (one logical expert twice): the "
                                  "physical->logical map does not match the ids")
    ids = np.ascontiguousarray(logical.transpose(1, 0, 2)).astype(np.int32)  # [T, L, k]
    meta = {"moe_layers": layers, "source": "sglang per_token",
            "ranks": sorted({r[1] for r in kept}), "forward_passes": len({r[0] for r in kept})}
    if out_path is not None:
        meta = write_trace(out_path, ids, num_experts, None, model=model, dataset=dataset, extra=meta)
    return ids, meta


# --------------------------------------------------------------------------------------------------------------
# Loads -> statistics

def _select_layers(load, layers):
    if layers is None:
        layers = [l for l in range(load.shape[0]) if load[l].any()]
        if not layers:
            raise ConversionError("every layer has zero load")
    return load[list(layers)], list(layers)


def _write_load_stats(out_dir, load, layers, top_k, model, dataset, source):
    load = np.asarray(load, dtype=np.int64)
    l, e = load.shape
    num_tokens = 0
    if top_k:
        totals = load.sum(axis=1)
        if np.all(totals % top_k == 0):
            num_tokens = int(totals.max() // top_k)
    aff = np.zeros((l, e, e), np.int64)
    meta = {"moe_layers": layers, "affinity_known": False, "source": source}
    if out_dir is not None:
        meta = write_stats(out_dir, load, aff, top_k=top_k, num_tokens=num_tokens, model=model, dataset=dataset,
                           extra=meta)
    return {"load": load, "affinity": aff, "meta": meta}


def sglang_stat_to_stats(path, out_dir: str | None = None, top_k: int = 0, model: str = "", dataset: str = "",
                         layers=None):
    """Converts an SGLang ``stat`` dump (``logical_count`` [steps, num_layers, E], or [num_layers, E]) to load
    statistics: load [L, E] = counts summed over the buffered steps, for the MoE layers (non-zero layers unless
    ``layers`` is given). Returns {"load", "affinity" (zeros), "meta"}; writes the folder if ``out_dir``."""
    dump = _load_any(str(path))
    lc = dump.get("logical_count") if isinstance(dump, dict) else dump
    if lc is None:
        raise ConversionError(f"{path}: no 'logical_count' (is this a stat dump? keys: {sorted(dump)})")
    lc = _to_numpy(lc, "logical_count")
    if lc.ndim == 2:
        lc = lc[None]
    if lc.ndim != 3:
        raise ConversionError(f"{path}: logical_count must be [steps, num_layers, E], got shape {lc.shape}")
    if not np.issubdtype(lc.dtype, np.integer) and not np.all(lc == np.round(lc)):
        raise ConversionError(f"{path}: logical_count must hold integer counts")
    if (lc < 0).any():
        raise ConversionError(f"{path}: logical_count has a negative count")
    load, layers = _select_layers(lc.sum(axis=0).astype(np.int64), layers)
    return _write_load_stats(out_dir, load, layers, top_k, model, dataset, "sglang stat")


def vllm_eplb_to_stats(path=None, out_dir: str | None = None, expert_load_window=None,
                       physical_to_logical_map=None, num_experts: int | None = None, top_k: int = 0,
                       model: str = "", dataset: str = "", layers=None):
    """Converts a vLLM EPLB load window to load statistics.

    ``expert_load_window`` int [window, L, P] (one rank's, or already all-reduced) or [ranks, window, L, P]
    (summed over ranks, as vLLM's rearrange all-reduces it), ``physical_to_logical_map`` int [L, P] with -1
    for unused (padding) slots. From a file (``path``: .pt/.json/.npz dict with those two keys) or arrays.
    Load [L, E] = window (and ranks) summed, physical slots added into their logical expert.
    Raises ConversionError for shape mismatches, ids outside [0, E), or load on a slot the map marks unused.
    """
    if path is not None:
        dump = _load_any(str(path))
        if not isinstance(dump, dict):
            raise ConversionError(f"{path}: expected a dict with 'expert_load_window' and 'physical_to_logical_map'")
        expert_load_window = dump.get("expert_load_window", expert_load_window)
        physical_to_logical_map = dump.get("physical_to_logical_map", physical_to_logical_map)
    w = _to_numpy(expert_load_window, "expert_load_window")
    m = _to_numpy(physical_to_logical_map, "physical_to_logical_map").astype(np.int64)
    if w.ndim == 4:
        w = w.sum(axis=0)
    if w.ndim != 3:
        raise ConversionError(f"expert_load_window must be [window, L, P] or [ranks, window, L, P], got {w.shape}")
    if m.ndim != 2 or m.shape != w.shape[1:]:
        raise ConversionError(f"physical_to_logical_map has shape {m.shape}, the window's layers x slots are "
                              f"{w.shape[1:]}")
    if (w < 0).any():
        raise ConversionError("expert_load_window has a negative count")
    phys = w.sum(axis=0).astype(np.int64)  # [L, P]
    if num_experts is None:
        num_experts = int(m.max()) + 1
    if (m >= num_experts).any() or (m < -1).any():
        l, p = np.argwhere((m >= num_experts) | (m < -1))[0]
        raise ConversionError(f"physical slot {p} of layer {l} maps to {m[l, p]}, outside [-1, {num_experts})")
    if ((m == -1) & (phys > 0)).any():
        l, p = np.argwhere((m == -1) & (phys > 0))[0]
        raise ConversionError(f"physical slot {p} of layer {l} has load {phys[l, p]} but the map marks it unused "
                              "(-1): the map does not match the window")
    load = np.zeros((m.shape[0], num_experts), np.int64)
    for l in range(m.shape[0]):
        ok = m[l] >= 0
        np.add.at(load[l], m[l][ok], phys[l][ok])
    if layers is None:
        layers = list(range(load.shape[0]))  # vLLM's window already holds only MoE layers
    load = load[list(layers)]
    return _write_load_stats(out_dir, load, list(layers), top_k, model, dataset, "vllm eplb")
