#!/usr/bin/env python3
"""grace's EPLB (C++, through the Python module) against DeepSeek's own `eplb.py`, input by input.

DeepSeek's file is not part of this project: pass its path (a checkout of github.com/deepseek-ai/EPLB; the figures in
bench/results/eplb.md name the commit). It needs torch (Debian: `apt-get install python3-torch`, 1.13 on Debian 12).

For each input it runs both and compares, per layer, `phy2log`, `logcnt` and `log2phy` exactly, and the maximum GPU
load (sum over a GPU's slots of load / replica count). It then runs `eplb.py` again with two of its numeric choices
switched to grace's -- loads in float64 instead of float32, and a stable descending sort (ties: lower index first)
instead of torch's default CPU sort -- to show that these two choices are the whole difference: with both switched
the outputs must be identical on every input, and the script exits 1 if they are not.

Usage:
    PYTHONPATH=build/python /usr/bin/python3 bench/eplb_vs_deepseek.py --eplb /path/to/EPLB/eplb.py [--json out.json]
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys

import numpy as np

import grace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eplb_reference import skewed_loads  # noqa: E402  (the DeepSeek-V3-scale input of bench/results/eplb.md)


def inputs():
    """(name, weight [L, E] float64, num_replicas, num_groups, num_nodes, num_gpus): the README example, the
    DeepSeek-V3-scale skewed loads, and 24 seeded token-count matrices (Zipf-like expert popularity, multinomial
    counts, so equal counts occur as they do in real statistics) over shapes and both policies."""
    readme = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], dtype=np.float64)
    yield "readme-hierarchical", readme, 16, 4, 2, 8
    yield "readme-global", readme, 16, 3, 2, 8
    yield "skewed_loads(58,256,2024)-hierarchical", skewed_loads(58, 256, 2024), 288, 8, 4, 32
    shapes = [  # (L, E, replicas, groups, nodes, gpus); groups % nodes != 0 selects the global policy
        (4, 16, 24, 4, 2, 8), (8, 64, 80, 8, 2, 8), (16, 64, 72, 8, 2, 4), (8, 128, 144, 8, 4, 16),
        (16, 128, 160, 16, 2, 8), (58, 256, 288, 8, 4, 32),
        (4, 16, 24, 3, 2, 8), (8, 64, 80, 7, 2, 8), (16, 64, 72, 3, 2, 4), (8, 128, 144, 7, 4, 16),
        (16, 128, 160, 5, 2, 8), (58, 256, 288, 7, 4, 32)]
    for i, (L, E, P, g, n, G) in enumerate(shapes):
        for tokens in (4096, 262144):
            rng = np.random.default_rng(1000 + 10 * i + (tokens > 4096))
            pop = 1.0 / np.arange(1, E + 1) ** 1.1
            w = np.stack([rng.multinomial(tokens, rng.permutation(pop / pop.sum())) for _ in range(L)])
            policy = "hierarchical" if g % n == 0 else "global"
            yield f"zipf-{L}x{E}-{tokens}tok-{policy}", w.astype(np.float64), P, g, n, G


def max_gpu_load(weight, phy2log, logcnt, num_gpus):
    """[L]: the most loaded GPU's load, each replica taking load / replica count, slots contiguous per GPU."""
    L, P = phy2log.shape
    per_slot = np.take_along_axis(weight / logcnt, phy2log, axis=1)
    return per_slot.reshape(L, num_gpus, P // num_gpus).sum(-1).max(-1)


@contextlib.contextmanager
def grace_numerics(torch, float64=True, stable=True):
    """Inside: torch's float() gives float64 and/or sort() is stable, the two choices grace makes."""
    float_orig, sort_orig = torch.Tensor.float, torch.Tensor.sort
    if float64:
        torch.Tensor.float = lambda self: self.double()
    if stable:
        torch.Tensor.sort = lambda self, dim=-1, descending=False: sort_orig(self, dim=dim, descending=descending,
                                                                          stable=True)
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.sort = float_orig, sort_orig


def compare(eplb, torch, weight, P, g, n, G):
    ours = grace.rebalance_experts(weight, P, g, n, G)
    ref = [t.numpy() for t in eplb.rebalance_experts(torch.from_numpy(weight.copy()), P, g, n, G)]
    L = weight.shape[0]
    same_layers = sum(
        bool(np.array_equal(ours[0][l], ref[0][l]) and np.array_equal(ours[2][l], ref[2][l]) and
             ours[1].shape == ref[1].shape and np.array_equal(ours[1][l], ref[1][l])) for l in range(L))
    ours_max = max_gpu_load(weight, ours[0], ours[2], G)
    ref_max = max_gpu_load(weight, ref[0], ref[2], G)
    return {"layers": L, "identical_layers": same_layers,
            "max_gpu_load_equal_layers": int(np.sum(np.isclose(ours_max, ref_max, rtol=0, atol=1e-9))),
            "max_gpu_load_ratio_worst": float(np.max(ours_max / ref_max)),
            "max_gpu_load_ratio_best": float(np.min(ours_max / ref_max))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eplb", required=True, help="path to DeepSeek's eplb.py")
    ap.add_argument("--json", help="write the per-input results here")
    args = ap.parse_args()
    import torch
    spec = importlib.util.spec_from_file_location("deepseek_eplb", args.eplb)
    eplb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eplb)

    rows, all_equal_switched = [], True
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    print("identical layers of eplb.py (as shipped; stable sort only; float64 only; both) vs grace, and the max GPU "
          "load (layers where equal; ours / theirs)")
    print(f"{'input':44s} {'shipped':>9s} {'stable':>9s} {'float64':>9s} {'both':>9s} {'max-load =':>11s} "
          f"{'ours/theirs':>15s}")
    for name, w, P, g, n, G in inputs():
        shipped = compare(eplb, torch, w, P, g, n, G)
        with grace_numerics(torch, float64=False, stable=True):
            stable_only = compare(eplb, torch, w, P, g, n, G)
        with grace_numerics(torch, float64=True, stable=False):
            float64_only = compare(eplb, torch, w, P, g, n, G)
        with grace_numerics(torch):
            switched = compare(eplb, torch, w, P, g, n, G)
        all_equal_switched &= switched["identical_layers"] == switched["layers"]
        rows.append({"input": name, "num_replicas": P, "num_groups": g, "num_nodes": n, "num_gpus": G,
                     "as_shipped": shipped, "stable_sort_only": stable_only, "float64_only": float64_only,
                     "float64_stable_sort": switched})
        L = shipped["layers"]
        print(f"{name:44s} {shipped['identical_layers']:>4d}/{L:<4d} {stable_only['identical_layers']:>4d}/{L:<4d} "
              f"{float64_only['identical_layers']:>4d}/{L:<4d} {switched['identical_layers']:>4d}/{L:<4d} "
              f"{shipped['max_gpu_load_equal_layers']:>5d}/{L:<5d} "
              f"{shipped['max_gpu_load_ratio_best']:.4f}-{shipped['max_gpu_load_ratio_worst']:.4f}")
    n_inputs = len(rows)
    print(f"inputs identical in every layer, eplb.py as shipped: "
          f"{sum(r['as_shipped']['identical_layers'] == r['as_shipped']['layers'] for r in rows)} of {n_inputs}")
    for key, label in (("stable_sort_only", "stable sort only"), ("float64_only", "float64 only")):
        print(f"inputs identical in every layer, eplb.py with {label}: "
              f"{sum(r[key]['identical_layers'] == r[key]['layers'] for r in rows)} of {n_inputs}")
    print(f"inputs identical in every layer, eplb.py with float64 + stable sort: "
          f"{sum(r['float64_stable_sort']['identical_layers'] == r['float64_stable_sort']['layers'] for r in rows)}"
          f" of {n_inputs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all_equal_switched else 1


if __name__ == "__main__":
    sys.exit(main())
