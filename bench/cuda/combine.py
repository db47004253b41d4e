#!/usr/bin/env python3
"""Joins gpu_bench.json (ours) and torch_ref.json into one markdown table: combine.py OUT_DIR.

"ours" is the default GEMM backend: sm90 (our Hopper grouped GEMM) when the run has it, hybrid otherwise; the
other backends get their own columns."""
import json
import sys

d = sys.argv[1]
ours = json.load(open(f"{d}/gpu_bench.json"))
try:
    ref = json.load(open(f"{d}/torch_ref.json"))
except (OSError, ValueError):
    ref = {"shapes": {}}
ALL = ["sm90", "hybrid", "cublas_grouped", "cublas_loop"]
first_run = next(iter(ours["shapes"].values()))["runs"][0]
backends = [b for b in ALL if b in first_run]
default = backends[0]
bw = ours["device"]["copy_GBps"]
lines = [f"device: {ours['device']['name']}; copy {bw:.0f} GB/s; "
         f"dense bf16 8192^3 {ours['device']['dense_gemm_8192_tflops']:.0f} TFLOP/s; ours = {default}", "",
         "| shape | T | skew | " + " | ".join(f"{b} layer (ms)" for b in backends) +
         " | torch eager (ms) | torch _grouped_mm (ms) | eager/ours | grouped_mm/ours | expert GEMM TF/s (" +
         "/".join(backends) + ") | vs dense (" + "/".join(backends) + ") | permute %BW | unpermute %BW |",
         "|" + "---|" * (11 + len(backends))]
f = lambda v: f"{v:.3f}" if v is not None else "n/a"
for name, s in ours["shapes"].items():
    tr = {r["T"]: r for r in ref["shapes"].get(name, [])}
    for r in s["runs"]:
        o = r[default]
        t = tr.get(r["T"], {})
        e_ms, gm_ms = t.get("eager_ms"), t.get("grouped_ms")
        ratio = lambda v: f"{v / o['layer_ms']:.2f}x" if v is not None else "n/a"
        lines.append(
            f"| {name} | {r['T']} | {r['max_over_mean']:.2f} | " + " | ".join(f"{r[b]['layer_ms']:.3f}" for b in backends) +
            f" | {f(e_ms)} | {f(gm_ms)} | {ratio(e_ms)} | {ratio(gm_ms)} | " +
            "/".join(f"{r[b]['gemm_tflops']:.0f}" for b in backends) + " | " +
            "/".join(f"{100 * r[b]['fraction_of_dense']:.0f}%" for b in backends) +
            f" | {100 * o['permute_GBps'] / bw:.0f}% | {100 * o['unpermute_GBps'] / bw:.0f}% |")
text = "\n".join(lines)
print(text)
open(f"{d}/summary.md", "w").write(text + "\n")
