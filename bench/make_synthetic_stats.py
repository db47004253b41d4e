#!/usr/bin/env python3
"""Writes a grace.stats/v1 folder (affinity.npy [L, E, E], load.npy [L, E], meta.json) of synthetic routing
statistics at any model shape, structured like bench/bm_plan.cpp's: 16 Zipf-frequent topics each favour a
block of experts, log-normal expert popularity, k experts per token by Gumbel top-k (without replacement).
`grace gen` has no preset with more than 128 experts, so plan timings at DeepSeek-V3 scale (256) and the
E = 64 ... 1024 table use this.

Usage: make_synthetic_stats.py OUT_DIR --layers L --experts E [--top-k 8] [--tokens 8192] [--seed 7]
"""
import argparse
import json
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    L, E, k, T = a.layers, a.experts, a.top_k, a.tokens
    rng = np.random.default_rng(a.seed)
    topics = 16
    zipf = 1.0 / np.arange(1, topics + 1)
    aff = np.zeros((L, E, E), dtype=np.int64)
    load = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        block = rng.permutation(E) * topics // E
        pop = 1.2 * rng.standard_normal(E)
        logw = pop[None, :] + np.where(block[None, :] == np.arange(topics)[:, None], 2.5, 0.0)
        topic = rng.choice(topics, size=T, p=zipf / zipf.sum())
        key = logw[topic] + rng.gumbel(size=(T, E))
        sel = np.argpartition(-key, k - 1, axis=1)[:, :k]
        onehot = np.zeros((T, E))  # float: the product goes through BLAS; counts stay exact (< 2^53)
        np.put_along_axis(onehot, sel, 1.0, axis=1)
        load[l] = onehot.sum(axis=0).astype(np.int64)
        co = (onehot.T @ onehot).astype(np.int64)
        np.fill_diagonal(co, 0)
        aff[l] = co
    os.makedirs(a.out, exist_ok=True)
    np.save(os.path.join(a.out, "affinity.npy"), aff)
    np.save(os.path.join(a.out, "load.npy"), load)
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump({"format": "grace.stats/v1", "num_layers": L, "num_experts": E, "top_k": k, "num_tokens": T,
                   "model": "synthetic", "dataset": "synthetic", "num_gpus": 0}, f)


if __name__ == "__main__":
    main()
