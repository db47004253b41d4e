#!/usr/bin/env python3
"""On a GPU: grace.engines' TableRouter on CUDA picks what it picks on the CPU, with no host synchronization
(torch.cuda.set_sync_debug_mode("error") while routing), and route() captured once in a CUDA graph and replayed
over batches of different real lengths (padding rows passed as valid_tokens) gives the CPU's picks and counters.
Run by bench/cuda/run_device_hooks.sh on the device (needs a GPU, torch and the grace module)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

BUILD = os.environ.get("GRACE_BUILD_DIR", "build")
GRACE = os.path.join(BUILD, "tools", "grace", "grace")
sys.path.insert(0, os.path.join(BUILD, "python"))
from grace.engines.routing import TableRouter  # noqa: E402


def sh(*args):
    subprocess.run([GRACE, *map(str, args)], check=True, capture_output=True)


def main():
    assert torch.cuda.is_available(), "no GPU"
    with tempfile.TemporaryDirectory() as d:
        sh("gen", "--preset", "olmoe", "--tokens", 4096, "--seed", 2, "-o", f"{d}/t.npy")
        sh("profile", f"{d}/t.npy", "--topology", "2x4", "-q", "-o", f"{d}/st")
        sh("plan", "--stats", f"{d}/st", "--topology", "2x4", "--slots-per-gpu", 9, "-q", "-o", f"{d}/p.json")
        plan = json.load(open(f"{d}/p.json"))
        ids = np.load(f"{d}/t.npy")
    L, k, rank = ids.shape[1], ids.shape[2], 3
    batches = [37, 500, 1, 1200, 263]
    for policy in ("tar", "wrr"):
        cpu = TableRouter(plan, policy=policy, ranks=[rank], device="cpu")
        gpu = TableRouter(plan, policy=policy, ranks=[rank], device="cuda")
        start = 0
        for b in batches:
            for layer in range(L):
                x = torch.from_numpy(np.ascontiguousarray(ids[start:start + b, layer])).to(torch.int64)
                want = cpu.route(layer, x, rank)
                xg = x.cuda()
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside route() raises
                got = gpu.route(layer, xg, rank)
                torch.cuda.set_sync_debug_mode(0)
                assert torch.equal(got.cpu(), want), (policy, b, layer)
            start += b
        assert torch.equal(gpu.offsets.cpu(), cpu.offsets), policy
        print(f"{policy}: CUDA picks == CPU picks over {len(batches)} batches x {L} layers, no host sync")

    # CUDA graph: one capture at the largest batch, replays with fewer real rows (padding must not count).
    B = 1200
    cpu = TableRouter(plan, policy="tar", ranks=[rank], device="cpu")
    gpu = TableRouter(plan, policy="tar", ranks=[rank], device="cuda")
    static_ids = torch.zeros((B, k), dtype=torch.int64, device="cuda")
    valid = torch.tensor(B, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gpu.route(0, static_ids, rank, valid_tokens=valid)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    gpu.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu.route(0, static_ids, rank, valid_tokens=valid)
    start = 0
    for n in (1200, 37, 500, 1, 999):
        x = torch.from_numpy(np.ascontiguousarray(ids[start:start + n, 0])).to(torch.int64)
        want = cpu.route(0, x, rank)
        static_ids.zero_()
        static_ids[:n].copy_(x.cuda())
        valid.fill_(n)
        graph.replay()
        assert torch.equal(out[:n].cpu(), want), n
        start += n
    assert torch.equal(gpu.offsets[0].cpu(), cpu.offsets[0])
    print("CUDA graph: one capture, 5 replays with 1..1200 real rows: picks and counters == CPU")
    print("ok")


if __name__ == "__main__":
    main()
