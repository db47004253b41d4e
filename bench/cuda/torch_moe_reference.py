#!/usr/bin/env python3
"""PyTorch references for the local MoE layer, timed on the same routing as bm_moe_gpu (which writes it).

Two implementations of out[t] = sum_j w[t,j] * W2_e (silu(W1_e x) * W3_e x), e = topk_idx[t,j], bf16:
  eager:   a loop over experts (torch.where per expert, index_add_), as in HF transformers' OLMoE/Qwen3-MoE.
  grouped: stable argsort by expert, gather, torch._grouped_mm for gate+up and down, weighted index_add_.
Both start from topk_idx/topk_weights (the route step is the sort). Timing: CUDA events, warm-up, median.
Usage: torch_moe_reference.py --routing-dir DIR --out FILE.json
"""
import argparse
import json
import statistics

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = {"olmoe": (64, 8, 2048, 1024), "qwen3-30b-a3b": (128, 8, 2048, 768)}
TOKENS = [512, 2048, 8192, 16384]


def eager(x, idx, w, w13, w2):
    E = w13.shape[0]
    out = torch.zeros_like(x)
    for e in range(E):
        tok, j = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].t()
        g, u = h.chunk(2, dim=-1)
        y = (F.silu(g) * u) @ w2[e].t()
        out.index_add_(0, tok, y * w[tok, j, None].to(y.dtype))
    return out


def grouped(x, idx, w, w13t, w2t):
    T, k = idx.shape
    E = w13t.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w13t, offs=offs)
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, w2t, offs=offs)
    out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32)
    out.index_add_(0, tok, y.float() * w.reshape(-1)[order, None])
    return out.to(x.dtype)


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--routing-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "shapes": {}}
    for name, (E, k, H, I) in SHAPES.items():
        w13 = (torch.randn(E, 2 * I, H, device=dev) / H**0.5).to(torch.bfloat16)
        w2 = (torch.randn(E, H, I, device=dev) / I**0.5).to(torch.bfloat16)
        w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: column-major B operands
        runs = []
        for T in TOKENS:
            base = f"{args.routing_dir}/{name}_T{T}"
            idx = torch.from_numpy(np.fromfile(base + ".i32", dtype=np.int32).reshape(T, k)).to(dev).long()
            w = torch.from_numpy(np.fromfile(base + ".f32", dtype=np.float32).reshape(T, k)).to(dev)
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            r = {"T": T}
            try:
                ref = eager(x, idx, w, w13, w2).float()
                got = grouped(x, idx, w, w13t, w2t).float()
                r["grouped_vs_eager_rel_l2"] = float((got - ref).norm() / ref.norm())
                r["grouped_ms"] = time_ms(lambda: grouped(x, idx, w, w13t, w2t), 3, args.iters)
            except Exception as e:  # report, keep the eager number
                r["grouped_error"] = repr(e)[:300]
            r["eager_ms"] = time_ms(lambda: eager(x, idx, w, w13, w2), 2, max(3, args.iters // 2))
            print(name, r, flush=True)
            runs.append(r)
        res["shapes"][name] = runs
        del w13, w2
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
