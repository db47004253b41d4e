#!/usr/bin/env python3
"""Writes bench/results/h100-measured.json (format grace.hardware/v1, the evaluator's hardware file) from the
measured per-expert GEMM table bench/results/h100-gemm-table.json.

- gemm_table: the measured `seconds` (CUDA-graph GPU time of gate+up and down for one expert) per shape.
- compute: the analytic fallback for shapes without a table, f(n) = 6*H*I*(n + n_half)/peak, fitted to both
  tables at once by least squares on relative error (a straight line a + b*n per shape with a shared peak and
  n_half). The fit error is printed.
- Links: one H100 was measured, no NVLink or network. The link figures are those of the evaluator's `h100-ib`
  preset (NVLink 450 GB/s per GPU per direction, 400 Gbit/s InfiniBand per node), stated in the description.

Usage: /usr/bin/python3 bench/cuda/make_hardware_preset.py [table.json] [out.json] [--column C] [--name N]
  --column seconds (default): cuBLAS per-expert times -> the `h100-measured` preset;
  --column seconds_sm90_grouped --name h100-sm90: the per-expert cost of our sm90 grouped GEMM in a grouped launch.
"""
import argparse
import json
import os

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("table", nargs="?", default="bench/results/h100-gemm-table.json")
ap.add_argument("out", nargs="?", default="bench/results/h100-measured.json")
ap.add_argument("--column", default="seconds")
ap.add_argument("--name", default="h100-measured")
args = ap.parse_args()
src, dst, column = args.table, args.out, args.column
table = json.load(open(src))
for s in table["shapes"].values():
    s["seconds"] = s[column]
method = ("cuBLAS bf16, fp32 accumulate, one expert per call" if column == "seconds" else
          "our sm90 grouped GEMM (wgmma + TMA, SiLU*up fused), per-expert share of a grouped launch over E experts")

rows, rhs, weights = [], [], []
for name, s in table["shapes"].items():
    flop = 6.0 * s["hidden"] * s["intermediate"]
    for n, t in zip(s["tokens"], s["seconds"]):
        # t = flop*(n + n_half)/peak = (flop*n)*x + flop*y with x = 1/peak, y = n_half/peak
        rows.append([flop * n, flop])
        rhs.append(t)
        weights.append(1.0 / t)
A = np.array(rows) * np.array(weights)[:, None]
b = np.array(rhs) * np.array(weights)
(x, y), *_ = np.linalg.lstsq(A, b, rcond=None)
peak = 1.0 / x
n_half = y / x
rel = []
for name, s in table["shapes"].items():
    flop = 6.0 * s["hidden"] * s["intermediate"]
    for n, t in zip(s["tokens"], s["seconds"]):
        rel.append(abs(flop * (n + n_half) / peak - t) / t)
print(f"analytic fit: peak {peak / 1e12:.1f} TFLOP/s, n_half {n_half:.1f} tokens; "
      f"relative error vs the table: median {np.median(rel):.3f}, max {max(rel):.3f}")

out = {
    "format": "grace.hardware/v1",
    "name": args.name,
    "description": ("Expert GEMM times measured on one " + table["device"] + " (bench/cuda/bm_moe_gpu, " + method +
                    "; bench/results/gpu.md); links not measured: NVLink 450 GB/s per GPU per "
                    "direction and 400 Gbit/s InfiniBand per node as in the h100-ib preset"),
    "element_size": 2,
    "intra_node": {"bandwidth_GBps": 450, "latency_us": 3},
    "cross_node": {"bandwidth_Gbps": 400, "latency_us": 5},
    "compute": {"peak_tflops": round(peak / 1e12, 1), "n_half": round(n_half, 1)},
    "gemm_table": {
        "device": table["device"],
        "shapes": {
            name: {"hidden": s["hidden"], "intermediate": s["intermediate"], "tokens": s["tokens"],
                   "seconds": s["seconds"]}
            for name, s in table["shapes"].items()
        },
    },
}
with open(dst + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
os.replace(dst + ".tmp", dst)
print("wrote", dst)
