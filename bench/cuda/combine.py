#!/usr/bin/env python3
"""Joins gpu_bench.json (ours) and torch_ref.json into one markdown table: combine.py OUT_DIR."""
import json
import sys

d = sys.argv[1]
ours = json.load(open(f"{d}/gpu_bench.json"))
try:
    ref = json.load(open(f"{d}/torch_ref.json"))
except (OSError, ValueError):
    ref = {"shapes": {}}
lines = [f"device: {ours['device']['name']}; copy {ours['device']['copy_GBps']:.0f} GB/s; "
         f"dense bf16 8192^3 {ours['device']['dense_gemm_8192_tflops']:.0f} TFLOP/s", "",
         "| shape | T | skew | ours hybrid (ms) | ours grouped (ms) | ours loop (ms) | torch eager (ms) | torch _grouped_mm (ms) | "
         "eager/ours | grouped_mm/ours | expert GEMM TF/s (hybrid/grouped/loop) | vs dense (hybrid/grouped/loop) | "
         "permute %BW | unpermute %BW |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for name, s in ours["shapes"].items():
    tr = {r["T"]: r for r in ref["shapes"].get(name, [])}
    for r in s["runs"]:
        g, l, h = r["cublas_grouped"], r["cublas_loop"], r["hybrid"]
        best = h["layer_ms"]
        t = tr.get(r["T"], {})
        e_ms, gm_ms = t.get("eager_ms"), t.get("grouped_ms")
        f = lambda v: f"{v:.3f}" if v is not None else "n/a"
        ratio = lambda v: f"{v / best:.2f}x" if v is not None else "n/a"
        bw = ours["device"]["copy_GBps"]
        lines.append(
            f"| {name} | {r['T']} | {r['max_over_mean']:.2f} | {h['layer_ms']:.3f} | {g['layer_ms']:.3f} | {l['layer_ms']:.3f} | {f(e_ms)} | "
            f"{f(gm_ms)} | {ratio(e_ms)} | {ratio(gm_ms)} | {h['gemm_tflops']:.0f}/{g['gemm_tflops']:.0f}/{l['gemm_tflops']:.0f} | "
            f"{100 * h['fraction_of_dense']:.0f}%/{100 * g['fraction_of_dense']:.0f}%/{100 * l['fraction_of_dense']:.0f}% | "
            f"{100 * h['permute_GBps'] / bw:.0f}% | {100 * h['unpermute_GBps'] / bw:.0f}% |")
text = "\n".join(lines)
print(text)
open(f"{d}/summary.md", "w").write(text + "\n")
