#!/usr/bin/env python3
"""One MoE block of a Hugging Face architecture, three ways, on the same input: the stock block, the block after
grace.hf.patch (grace.ep on the GPU), and a float32 reference computed from the block's own router output and expert
weights (y = sum_j w_j * W2_e(silu(G_e x) * U_e x)). Prints the relative L2 error of stock and GRACE against the
reference, per architecture and T, so that a whole-model divergence (bench/torch/whole_model.py) can be pinned on the
block or ruled out. GPT-OSS (clamped SwiGLU with biases) is not covered by the reference and is skipped.

Usage (device): PYTHONPATH=build-dev/python python3 bench/torch/hf_block_check.py --archs mixtral,olmoe \
    --tokens 512,32768 [--out FILE.json]
The model is built from whole_model.py's config at one decoder layer, random bf16 weights.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import whole_model  # noqa: E402


def experts_reference(x, idx, w, w13, w2):
    """float32 SwiGLU experts: x [T, H], idx/w [T, k] (logical ids), w13 [E, 2I, H], w2 [E, H, I]."""
    import torch

    x = x.float()
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        tok, j = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].float().t()
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].float().t()
        out.index_add_(0, tok, y * w[tok, j, None].float())
    return out


def check_arch(arch, tokens, device):
    import torch

    import grace.hf as hf
    from grace.recorder import route_from_logits, routing_kwargs, selection_from_router_output

    info = whole_model.plan_archs(argparse.Namespace(archs=[arch], layers=1, weight_budget_gib=1e9))[arch]
    model = whole_model.build_model(info, device, torch.bfloat16)
    plan, _ = whole_model.make_plan(model, info, device)
    name, block, family = hf.moe_blocks(model)[0]
    experts = getattr(block, "experts")
    layout = hf._expert_layout(name, experts)
    if layout.kind == "gpt_oss":
        return {"skipped": "GPT-OSS experts are not plain SwiGLU"}
    w13, w2 = hf._expert_tensors(experts, layout, list(range(layout.num_experts)))
    w13, w2 = w13.clone(), w2.clone()  # the patch may re-lay out the module's own tensors
    gate = getattr(block, "gate", None) or getattr(block, "router")
    top_k = info["config"]["num_experts_per_tok"]

    def select(moe_block, x):
        """(ids [T, k], weights [T, k]) from the block's router, as the block itself would route x."""
        out = gate(x)
        sel = selection_from_router_output(out)
        if sel is not None:
            return sel
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return route_from_logits(logits, family, top_k, **routing_kwargs(moe_block, model.config))

    h = layout.hidden
    rows = []
    inputs = {}
    g = torch.Generator(device="cpu").manual_seed(5)
    for t in tokens:
        x = torch.randn(1, t, h, generator=g).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = experts_reference(x.reshape(-1, h), *select(block, x.reshape(-1, h)), w13, w2)
            y = block(x)
            y = (y[0] if isinstance(y, (tuple, list)) else y).reshape(-1, h).float()
        inputs[t] = x
        rows.append(dict(T=t, stock_rel_err=float((y - ref).norm() / ref.norm())))
    hf.patch(model, plan)
    patched = hf.moe_blocks(model)  # empty: the blocks were replaced
    block = model.get_submodule(name)
    for row in rows:
        with torch.no_grad():
            y = block(inputs[row["T"]])
            y = (y[0] if isinstance(y, (tuple, list)) else y).reshape(-1, h).float()
        # the reference again for this T (same input, same router)
        with torch.no_grad():
            x = inputs[row["T"]].reshape(-1, h)
            ref = experts_reference(x, *select(getattr(block, "original", block), x), w13, w2)
        row["grace_rel_err"] = float((y - ref).norm() / ref.norm())
    del patched
    return {"block": type(getattr(block, "original", block)).__name__, "E": layout.num_experts, "H": h,
            "I": layout.inter, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="olmoe,mixtral")
    ap.add_argument("--tokens", default="512,32768")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    report = {}
    for arch in args.archs.split(","):
        report[arch] = check_arch(arch, [int(t) for t in args.tokens.split(",")], args.device)
        print(arch, json.dumps(report[arch]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
