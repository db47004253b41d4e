"""Pure-NumPy reader/writer of GRACE trace and statistics files (no compiled extension needed).

Layouts (identical to what the C++ core writes, see include/grace/trace.hpp and include/grace/stats.hpp):

* trace: ``NAME.npy`` int32 [T, L, k] expert ids, ``NAME.json`` metadata
  ``{"format": "grace.trace/v1", "num_experts", "num_layers", "top_k", "num_tokens", "model", "dataset",
  "weights"}`` and, with gate weights, ``NAME.weights.npy`` float32 [T, L, k].
* statistics folder: ``meta.json`` (``"format": "grace.stats/v1"``), ``affinity.npy`` int64 [L, E, E],
  ``load.npy`` int64 [L, E], optionally ``source_load.npy`` int64 [L, G, E].

Files are written to a temporary name and renamed, so a failure leaves no partial file.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

TRACE_FORMAT = "grace.trace/v1"
STATS_FORMAT = "grace.stats/v1"


def _stem(path: str) -> str:
    return path[:-4] if path.endswith(".npy") else path


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(path: str, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def _save_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def validate_trace_arrays(ids: np.ndarray, num_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Checks a [T, L, k] (or [T, k]) id array as the C++ core does; returns it as int32 [T, L, k].

    Raises ValueError naming the first violation: rank, T >= 1, 1 <= k <= E, ids in [0, E), no id repeated in
    one token's top-k at one layer, weights finite and shaped like the ids.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 2:
        ids = ids[:, None, :]
    if ids.ndim != 3:
        raise ValueError(f"expert ids must have shape [T, L, k] or [T, k], got {ids.shape}")
    t, _, k = ids.shape
    if t < 1:
        raise ValueError("a trace needs at least one token")
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k = {k} must be in [1, E = {num_experts}]")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        bad = np.argwhere((ids < 0) | (ids >= num_experts))[0]
        raise ValueError(f"expert id {ids[tuple(bad)]} at token {bad[0]}, layer {bad[1]} is outside [0, {num_experts})")
    srt = np.sort(ids, axis=2)
    dup = np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)) if k > 1 else np.zeros((0, 2), int)
    if len(dup):
        raise ValueError(f"token {dup[0][0]} repeats an expert at layer {dup[0][1]}: {ids[dup[0][0], dup[0][1]].tolist()}")
    if weights is not None:
        w = np.asarray(weights)
        if w.ndim == 2:
            w = w[:, None, :]
        if w.shape != ids.shape:
            raise ValueError(f"gate weights have shape {np.asarray(weights).shape}, the ids {ids.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("gate weights contain a non-finite value")
    return ids.astype(np.int32, copy=False)


def write_trace(path: str, ids, num_experts: int, weights=None, model: str = "", dataset: str = "",
                extra: dict | None = None) -> dict:
    """Writes a trace (``path`` ends in .npy) plus its metadata; returns the metadata dict written.

    ``extra`` adds fields to the metadata (the C++ loader ignores unknown fields).
    """
    ids32 = validate_trace_arrays(ids, int(num_experts), weights)
    t, l, k = ids32.shape
    stem = _stem(path)
    meta = {"format": TRACE_FORMAT, "num_experts": int(num_experts), "num_layers": int(l), "top_k": int(k),
            "num_tokens": int(t), "model": model, "dataset": dataset, "weights": None}
    if weights is not None:
        w = np.asarray(weights, dtype=np.float32).reshape(ids32.shape)
        wpath = stem + ".weights.npy"
        _save_npy(wpath, w)
        meta["weights"] = os.path.basename(wpath)
    if extra:
        meta.update(extra)
    _save_npy(stem + ".npy", ids32)
    _save_json(stem + ".json", meta)
    return meta


def read_trace(path: str):
    """Reads a trace written by write_trace or the C++ core: returns (ids int32 [T, L, k], weights or None, meta)."""
    stem = _stem(path)
    ids = np.load(stem + ".npy", allow_pickle=False)
    meta = {}
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            meta = json.load(f)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    weights = None
    if meta.get("weights"):
        weights = np.load(os.path.join(os.path.dirname(os.path.abspath(path)), meta["weights"]), allow_pickle=False)
        weights = weights.reshape(ids.shape)
    return ids.astype(np.int32, copy=False), weights, meta


def write_stats(folder: str, load, affinity, top_k: int = 0, num_tokens: int = 0, model: str = "",
                dataset: str = "", source_load=None, extra: dict | None = None) -> dict:
    """Writes a ``grace.stats/v1`` folder (created if missing; its parent must exist); returns meta.

    ``load`` int [L, E] (or [E]), ``affinity`` int [L, E, E] (or [E, E]) counting unordered pairs, symmetric,
    zero diagonal; ``source_load`` int [L, G, E] or None. Raises ValueError for inconsistent shapes/values.
    """
    load = np.asarray(load)
    affinity = np.asarray(affinity)
    if load.ndim == 1:
        load = load[None, :]
    if affinity.ndim == 2:
        affinity = affinity[None, :, :]
    if load.ndim != 2 or affinity.ndim != 3:
        raise ValueError(f"load must be [L, E] and affinity [L, E, E]; got {load.shape} and {affinity.shape}")
    l, e = load.shape
    if affinity.shape != (l, e, e):
        raise ValueError(f"affinity has shape {affinity.shape}, expected {(l, e, e)} from load {load.shape}")
    for name, a in (("load", load), ("affinity", affinity)):
        if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(np.asarray(a) != np.round(a)):
            raise ValueError(f"{name} must hold non-negative integer counts")
    if np.any(affinity != affinity.transpose(0, 2, 1)):
        raise ValueError("affinity must be symmetric")
    if np.any(np.einsum("lii->li", affinity) != 0):
        raise ValueError("affinity must have a zero diagonal")
    num_gpus = 0
    if source_load is not None:
        source_load = np.asarray(source_load)
        if source_load.ndim != 3 or source_load.shape[0] != l or source_load.shape[2] != e:
            raise ValueError(f"source_load must be [L, G, E] = [{l}, G, {e}], got {source_load.shape}")
        num_gpus = source_load.shape[1]
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{folder}: parent folder {parent} does not exist")
    os.makedirs(folder, exist_ok=True)
    meta = {"format": STATS_FORMAT, "num_layers": int(l), "num_experts": int(e), "top_k": int(top_k),
            "num_tokens": int(num_tokens), "model": model, "dataset": dataset, "num_gpus": int(num_gpus)}
    if extra:
        meta.update(extra)
    _save_npy(os.path.join(folder, "affinity.npy"), affinity.astype(np.int64))
    _save_npy(os.path.join(folder, "load.npy"), load.astype(np.int64))
    if source_load is not None:
        _save_npy(os.path.join(folder, "source_load.npy"), source_load.astype(np.int64))
    _save_json(os.path.join(folder, "meta.json"), meta)
    return meta


def read_stats(folder: str):
    """Reads a statistics folder: returns dict with meta, load [L, E], affinity [L, E, E], source_load or None."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    out = {"meta": meta, "load": np.load(os.path.join(folder, "load.npy")),
           "affinity": np.load(os.path.join(folder, "affinity.npy")), "source_load": None}
    sp = os.path.join(folder, "source_load.npy")
    if os.path.exists(sp):
        out["source_load"] = np.load(sp)
    return out


def profile_numpy(ids) -> tuple[np.ndarray, np.ndarray]:
    """Reference profiler (spec §2) in NumPy: returns (load int64 [L, E], affinity int64 [L, E, E]) of a
    [T, L, k] id array with E = max id + 1. For cross-checks; the C++ profiler is the fast one."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    t, l, k = ids.shape
    e = int(ids.max()) + 1
    load = np.zeros((l, e), np.int64)
    aff = np.zeros((l, e, e), np.int64)
    for layer in range(l):
        onehot = np.zeros((t, e), np.int64)
        np.put_along_axis(onehot, ids[:, layer, :].astype(np.int64), 1, axis=1)
        load[layer] = onehot.sum(0)
        a = onehot.T @ onehot
        np.fill_diagonal(a, 0)
        aff[layer] = a
    return load, aff
