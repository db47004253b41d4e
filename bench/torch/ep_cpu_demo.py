"""grace.ep on CPU (gloo): an expert-parallel MoE layer of a GRACE plan, driven from PyTorch.

    PYTHONPATH=build/python torchrun --nproc_per_node 2 bench/torch/ep_cpu_demo.py --topology 1x2
    PYTHONPATH=build/python /usr/bin/python3 bench/torch/ep_cpu_demo.py          # one process, no torch.distributed

Every rank builds the same seeded expert weights and a plan (--plan FILE, or a small one made here: experts spread
round-robin, experts 0 and 1 replicated on the next GPU with WRR weights 2:1), routes its own random tokens, runs
the layer both whole (buf.moe) and in phases (dispatch, experts, combine), and checks the output against a dense
float64 reference of all experts on its own tokens. Rank 0 prints the error, the bytes its layer sent per link class
and the mean time per call.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import grace
import grace.ep as ep


def make_plan(nodes, per_node, num_experts, top_k):
    world = nodes * per_node
    instances = [[e % world] + ([(e + 1) % world] if e < 2 and world > 1 else []) for e in range(num_experts)]
    return {"format": "grace.plan/v1", "num_experts": num_experts, "num_layers": 1, "top_k": top_k,
            "topology": {"nodes": nodes, "gpus_per_node": per_node}, "method": "demo",
            "layers": [{"layer": 0, "gpu_experts": [sorted(e for e in range(num_experts) if g in instances[e])
                                                    for g in range(world)],
                        "primary_gpu": [inst[0] for inst in instances],
                        "routing": {"policy": "wrr", "period": 3, "instances": instances,
                                    "weights": [[2, 1] if len(i) == 2 else [3] for i in instances]}}]}


def reference(x, ids, w, w13, w2, inter):
    x, a, b = x.double(), w13.double(), w2.double()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                gate, up = a[e, :inter] @ x[t], a[e, inter:] @ x[t]
                y[t] += float(w[t, j]) * (b[e] @ (torch.nn.functional.silu(gate) * up))
    return y


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", help="grace.plan/v1 file (default: a small plan made here)")
    p.add_argument("--topology", default=None, help="NxM (default: 1 x world size, or the plan's)")
    p.add_argument("--scheme", default="hsc", choices=ep.SCHEMES)
    p.add_argument("--policy", default="wrr")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inter", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank and call")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()

    if "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(1)
    if args.plan:
        plan, E = args.plan, grace.load_plan(args.plan)["num_experts"]
    else:
        n, m = (int(v) for v in (args.topology or f"1x{world}").split("x"))
        plan, E = make_plan(n, m, args.experts, args.top_k), args.experts
    buf = ep.Buffer(None, plan, 0, topology=args.topology, scheme=args.scheme, policy=args.policy, timeout=60)

    g = torch.Generator().manual_seed(7)  # the same weights on every rank
    w13_all = (torch.rand(E, 2 * args.inter, args.hidden, generator=g) - 0.5) / 4
    w2_all = (torch.rand(E, args.hidden, args.inter, generator=g) - 0.5) / 4
    w13, w2 = w13_all[buf.local_experts].contiguous(), w2_all[buf.local_experts].contiguous()

    g = torch.Generator().manual_seed(100 + rank)  # each rank's own tokens
    max_err, seconds = 0.0, 0.0
    for it in range(args.iters):
        x = torch.rand(args.tokens, args.hidden, generator=g) * 2 - 1
        ids = torch.stack([torch.randperm(E, generator=g)[:args.top_k] for _ in range(args.tokens)])
        w = torch.softmax(torch.rand(args.tokens, args.top_k, generator=g), dim=1)
        t0 = time.perf_counter()
        y = buf.moe(x, ids, w, w13, w2)
        seconds += time.perf_counter() - t0
        recv_x, recv_topk, recv_weights, handle = buf.dispatch(x, ids, w)
        y_phases = buf.combine(buf.experts(recv_x, recv_topk, recv_weights, w13, w2), handle)
        ref = reference(x, ids, w, w13_all, w2_all, args.inter)
        max_err = max(max_err, float((y.double() - ref).abs().max() / ref.abs().max()))
        if not torch.allclose(y, y_phases, rtol=1e-5, atol=1e-6):
            sys.exit(f"rank {rank}: the phases differ from moe")
    errs = torch.tensor([max_err])
    if dist.is_initialized():
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    stats = buf.last_stats()
    if rank == 0:
        print(f"grace.ep CPU demo: {world} process(es), topology {buf.topology[0]}x{buf.topology[1]}, "
              f"scheme {args.scheme}, policy {args.policy}, E={E} k={args.top_k} H={args.hidden} I={args.inter}, "
              f"{args.tokens} tokens/rank x {args.iters} calls")
        print(f"max relative error vs float64 dense reference (all ranks): {errs.item():.2e}")
        for phase in ("dispatch", "combine"):
            b = stats[phase]
            print(f"rank 0 last call {phase}: intra-node {b['intra_node']['copies']} copies "
                  f"{b['intra_node']['payload']} B payload, cross-node {b['cross_node']['copies']} copies "
                  f"{b['cross_node']['payload']} B payload")
        print(f"rank 0 mean time per moe call: {seconds / args.iters * 1e3:.2f} ms")
    if errs.item() > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
