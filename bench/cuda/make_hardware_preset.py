#!/usr/bin/env python3
"""Writes bench/results/h100-measured.json (format grace.hardware/v1, the evaluator's hardware file) from the
measured per-expert GEMM table bench/results/h100-gemm-table.json.

- gemm_table: the measured `seconds` (CUDA-graph GPU time of gate+up and down for one expert) per shape.
- compute: the analytic fallback for shapes without a table, f(n) = 6*H*I*(n + n_half)/peak, fitted to both
  tables at once by least squares on relative error (a straight line a + b*n per shape with a shared peak and
  n_half). The fit error is printed.
- Links: one H100 was measured, no NVLink or network. The link figures are those of the evaluator's `h100-ib`
  preset (NVLink 450 GB/s per GPU per direction, 400 Gbit/s InfiniBand per node), stated in the description.

Usage: /usr/bin/python3 bench/cuda/make_hardware_preset.py [table.json] [out.json]
"""
import json
import sys

import numpy as np

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/h100-gemm-table.json"
dst = sys.argv[2] if len(sys.argv) > 2 else "bench/results/h100-measured.json"
table = json.load(open(src))

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
    "name": "h100-measured",
    "description": ("Expert GEMM times measured on one " + table["device"] + " (bench/cuda/bm_moe_gpu, cuBLAS bf16, "
                    "fp32 accumulate; bench/results/gpu.md); links not measured: NVLink 450 GB/s per GPU per "
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
import os

os.replace(dst + ".tmp", dst)
print("wrote", dst)
