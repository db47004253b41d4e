#!/usr/bin/python3
"""Vectorized NumPy reference for the profiler (spec §2): per layer, A_ij = tokens whose top-k holds both i and j
(symmetric, zero diagonal) and loads l_i. Two honest vectorized methods; `--method best` times both on the first
layer and uses the faster for the whole trace.

  bincount: for every pair of top-k positions (a < b), np.bincount over i*E + j of that position pair, then
            symmetrize (k(k-1)/2 bincounts of T values per layer);
  onehot:   X = one-hot [T, E] (float32) per layer, A = X^T X (BLAS sgemm) minus the diagonal.

Usage: profile_numpy.py TRACE.npy --experts E [--method best|bincount|onehot] [--check STATS_DIR] [--chunk N]
Prints the load/compute seconds; with --check, compares with grace's stats folder and exits 1 on a mismatch.
"""
import argparse
import sys
import time

import numpy as np


def layer_bincount(ids, E):
    """ids [T, k] int -> A [E, E] int64 (symmetric, zero diagonal)."""
    T, k = ids.shape
    ids = ids.astype(np.int64)
    counts = np.zeros(E * E, dtype=np.int64)
    for a in range(k):
        base = ids[:, a] * E
        for b in range(a + 1, k):
            counts += np.bincount(base + ids[:, b], minlength=E * E)
    A = counts.reshape(E, E)
    return A + A.T  # (i, j) and (j, i) orders of the same unordered pair; the diagonal stays 0


def layer_onehot(ids, E, chunk=1 << 16):
    T, k = ids.shape
    A = np.zeros((E, E), dtype=np.float64)
    rows = np.arange(min(chunk, T))[:, None]
    for s in range(0, T, chunk):
        part = ids[s:s + chunk]
        X = np.zeros((len(part), E), dtype=np.float32)
        X[rows[:len(part)], part] = 1.0
        A += (X.T @ X).astype(np.float64)  # exact: float32 sums of 0/1 stay exact below 2^24 per chunk
    A = np.rint(A).astype(np.int64)
    np.fill_diagonal(A, 0)
    return A


METHODS = {"bincount": layer_bincount, "onehot": layer_onehot}


def profile(trace, E, method):
    L = trace.shape[1]
    A = np.empty((L, E, E), dtype=np.int64)
    load = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        ids = trace[:, l, :]
        A[l] = METHODS[method](ids, E)
        load[l] = np.bincount(ids.ravel(), minlength=E)
    return A, load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--method", default="best", choices=["best", "bincount", "onehot"])
    ap.add_argument("--check", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = np.load(args.trace)
    if trace.ndim == 2:
        trace = trace[:, None, :]
    t1 = time.perf_counter()
    method = args.method
    if method == "best":
        probe = trace[: min(len(trace), 200000), 0, :]
        times = {}
        for m in METHODS:
            s = time.perf_counter()
            METHODS[m](probe, args.experts)
            times[m] = time.perf_counter() - s
        method = min(times, key=times.get)
        print("probe (layer 0, %d tokens): %s -> using %s" % (
            len(probe), ", ".join("%s %.3f s" % kv for kv in times.items()), method))
    t2 = time.perf_counter()
    A, load = profile(trace, args.experts, method)
    t3 = time.perf_counter()
    print("numpy[%s]: load %.3f s, compute %.3f s, total %.3f s" % (method, t1 - t0, t3 - t2, (t1 - t0) + (t3 - t2)))
    if args.check:
        gA = np.load(args.check + "/affinity.npy")
        gl = np.load(args.check + "/load.npy")
        if not (np.array_equal(gA, A) and np.array_equal(gl, load)):
            print("MISMATCH between NumPy and grace", file=sys.stderr)
            return 1
        print("grace's statistics equal NumPy's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
