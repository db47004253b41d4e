#!/usr/bin/env python3
"""grace.ep.moe (CUDA backend) against the same layer under `grace run`, vLLM's Triton fused MoE and
torch._grouped_mm, on one GPU (topology 1x1), same routing and gate weights for all, in one run.

Shapes: olmoe (H=2048, I=1024, E=64, k=8) and qwen3-30b-a3b (H=2048, I=768, E=128, k=8); T in --tokens
(default 512, 2048, 8192). Routing: layer 0 of `grace gen --preset NAME --tokens T --seed 1` (ids and gate
weights), plan `grace plan --topology 1x1` from that trace. Per point:
  ep_moe_ms        grace.ep.moe(..., buffer=Buffer(None, plan, 0)) wall time per call (host clock around the call and a stream
                   synchronize; includes the host waits the layer needs), median of --iters after --warmup
  ep_raw_ms        the same C++ call (GpuLayer.forward_async) with prebuilt DLPack capsules and outputs
  binding_us       what grace.ep.moe adds to that C++ call, in microseconds: median over max(--iters, 50) alternating
                   pairs of (ep.moe wall time - raw call wall time); covers the Buffer, torch.empty, the capsules and
                   the int64 ids (the raw call gets int32 ids); carries the jitter of the GPU time in each wall time
  binding_host_us  the same pairs with Buffer(check_ids=False) against its layer's raw call (same int64 ids), each
                   timed from call to return (the stream drained between calls, untimed): the host cost alone
  cpp_total_ms     GpuMoeLayer's own total_s of the synchronous path (forward_device; the stages synchronized);
                   cpp_stages_ms: its routing / layout / dispatch / expert / combine times (medians)
  grace_run_ms     `grace run --backend cuda` per-step layer time on the same routing: (time of W+1 steps
                   - time of 1 step) / W, so the first call's allocations drop out
  vllm_ms, vllm_graph_ms   vLLM fused_moe_forward (vendored Triton kernel, ../shared/bench/vllm_fused_moe_ref.py,
                   found via --vllm-ref), eager and replayed as a CUDA graph
  grouped_mm_ms, grouped_mm_graph_ms   a torch._grouped_mm MoE (sort by expert, two grouped GEMMs, SiLU*up,
                   weighted index_add), eager and as a CUDA graph
Ratios printed: vllm/ep, vllm_graph/ep, grouped_mm/ep, grace_run/ep (> 1: grace.ep faster).
  ep_nocheck_ms, ep_nocheck_event_ms   the same with Buffer(check_ids=False) (no host wait: the ids' range check
                   dropped, grace.hf's default): wall time per call as ep_moe_ms, and CUDA-event time around the call
                   as vllm_ms is timed (ratios vllm/nc, vllm_g/nc use the event time)
  ep_graph_ms      that Buffer(check_ids=False)'s moe captured in a CUDA graph (after uncaptured warm-up calls) and
                   replayed, timed as vllm_graph_ms (ratio vllm_g/ep_g: both replayed as graphs); the one-GPU path
                   with check_ids=True waits on the host and cannot be captured
--kernels adds kernels_us: each method's kernels and device time per call (torch.profiler), largest first.
Correctness: every method's output is compared with a torch fp32 eager reference (rel L2 printed).
Usage (device): python3 -X faulthandler bench/torch/bm_ep_moe.py --build build-dev --out $OUT/bm_ep_moe.json
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch  # torch before grace (see bench/cuda/run_device_ep.sh)
import torch.nn.functional as F

SHAPES = {"olmoe": (64, 8, 2048, 1024), "qwen3-30b-a3b": (128, 8, 2048, 768)}


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_wall_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.current_stream().synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def paired_overhead_us(fn, base, pairs, host_only=False):
    """Median over `pairs` alternating calls of (time of fn - time of base) in microseconds. By default each time is
    the call's wall time up to the end of its GPU work: the GPU work of the two is the same, so the difference is
    what fn adds on the host; pairing cancels the drift that two separate medians of millisecond calls keep (tens
    of microseconds), not the jitter of each call's GPU time. host_only: each call is timed to its return and the
    stream drained after it, untimed: for calls that queue their work without waiting for the GPU
    (check_ids=False), the host cost alone."""
    fn(), base()
    torch.cuda.synchronize()
    diffs = []
    for _ in range(pairs):
        t = []
        for f in (fn, base):
            t0 = time.perf_counter()
            f()
            if not host_only:
                torch.cuda.current_stream().synchronize()
            t.append(time.perf_counter() - t0)
            if host_only:
                torch.cuda.current_stream().synchronize()
        diffs.append((t[0] - t[1]) * 1e6)
    return statistics.median(diffs)


def event_ms(fn, warmup, iters):
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


def graph_ms(fn, warmup, iters):
    """(median ms of a replay, the output tensor the replays write) of fn captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return event_ms(g.replay, warmup, iters), out


def kernel_table(fn, calls, top=8):
    """Device time per call of fn's CUDA kernels and copies (torch.profiler over `calls` calls after one warm-up):
    [[name (60 chars), microseconds per call], ...], the `top` largest first, then the total over all of them."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "cuda_time_total", 0)
        if dev_us > 0:
            rows.append([ev.key[:60], dev_us / calls])
    rows.sort(key=lambda r: -r[1])
    return rows[:top] + [["total", sum(r[1] for r in rows)]]


def eager_reference(x, ids, w, w13, w2):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    I = w2.shape[2]
    xf = x.float()
    for e in range(w13.shape[0]):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = xf[tok] @ w13[e].float().t()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].float().t()
        out.index_add_(0, tok, y * w[tok, j, None])
    return out


def grouped_mm_moe(x, ids, w, w13, w2):
    """A sync-free torch._grouped_mm MoE (bf16 GEMMs, fp32 weighted sum)."""
    T, k = ids.shape
    E, I = w13.shape[0], w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * w.reshape(-1)[order, None])
    return out


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def grace_run_ms(grace, d, plan, ids, gw, name, steps):
    """Per-step layer time of `grace run --backend cuda` on a trace that repeats the routing `steps` times."""
    def run(n):
        base = f"{d}/rep{n}"
        np.save(base + ".npy", np.ascontiguousarray(np.tile(ids[:, None, :], (n, 1, 1)).astype(np.int32)))
        np.save(base + ".weights.npy", np.ascontiguousarray(np.tile(gw[:, None, :], (n, 1, 1)).astype(np.float32)))
        subprocess.run([grace, "run", "--plan", plan, "--trace", base + ".npy", "--gate-weights", base + ".weights.npy",
                        "--model", name, "--preset", name, "--dtype", "bf16", "--layers", "1", "--batch-tokens",
                        str(ids.shape[0]), "--backend", "cuda", "--routing", "tar", "--comm", "hsc", "-o",
                        base + ".run.json"], check=True, capture_output=True)
        # Not base + ".json": that name is the trace's metadata sidecar, which grace run reads beside the .npy.
        with open(base + ".run.json") as f:
            return json.load(f)["per_layer"][0]["time_s"]["total"]["max"]
    one, many = run(1), run(steps)
    return (many - one) / (steps - 1) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.environ.get("GRACE_BUILD_DIR", "build"))
    ap.add_argument("--vllm-ref", default=".deps/vllm_fused_moe_ref.py",
                    help="vllm_fused_moe_ref.py (copy of ../shared/bench/, carried to the device)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grace-run-steps", type=int, default=6,
                    help="W+1 steps of the grace run difference (< 2: grace run is not timed)")
    ap.add_argument("--kernels", action="store_true",
                    help="also list each method's kernels with their device time per call (torch.profiler)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(args.build, "python"))
    import grace.ep as ep  # noqa: E402
    from grace.ep import _cuda  # noqa: E402

    grace = os.path.join(args.build, "tools", "grace", "grace")
    assert torch.cuda.is_available() and _cuda.available(), "needs a GPU and a CUDA build of grace"
    dev = torch.device("cuda", torch.cuda.current_device())
    device_name = torch.cuda.get_device_name()
    vllm = None
    if os.path.exists(args.vllm_ref):
        try:
            vllm = load_module(args.vllm_ref, "vllm_fused_moe_ref")
        except Exception as e:  # Triton missing: the other columns still run
            print(f"vLLM reference unavailable: {e!r}", flush=True)
    else:
        print(f"vLLM reference not found at {args.vllm_ref}: its columns are skipped", flush=True)
    res = {"device": device_name, "torch": torch.__version__, "topology": "1x1", "scheme": "hsc", "policy": "tar",
           "iters": args.iters, "warmup": args.warmup, "shapes": {}}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        for name in args.shapes.split(","):
            E, k, H, I = SHAPES[name]
            rows = []
            for T in map(int, args.tokens.split(",")):
                subprocess.run([grace, "gen", "--preset", name, "--tokens", str(T), "--seed", "1", "-o",
                                f"{d}/t.npy"], check=True, capture_output=True)
                subprocess.run([grace, "plan", "--trace", f"{d}/t.npy", "--topology", "1x1", "-q", "-o",
                                f"{d}/p.json"], check=True, capture_output=True)
                ids_np = np.load(f"{d}/t.npy")[:, 0, :].astype(np.int64)
                gw_np = np.load(f"{d}/t.weights.npy")[:, 0, :].astype(np.float32)
                with open(f"{d}/p.json") as f:
                    plan = json.load(f)
                slots = plan["layers"][0]["gpu_experts"][0]
                assert sorted(slots) == list(range(E)), "1x1 plan must hold every expert once"
                ids = torch.from_numpy(ids_np).to(dev)
                ids32 = ids.to(torch.int32)
                gw = torch.from_numpy(gw_np).to(dev)
                x = torch.randn(T, H, device=dev).to(torch.bfloat16)
                w13 = (torch.randn(E, 2 * I, H, device=dev) / H**0.5).to(torch.bfloat16)  # by logical id
                w2 = (torch.randn(E, H, I, device=dev) / I**0.5).to(torch.bfloat16)
                order = torch.tensor(slots, device=dev)
                w13_local, w2_local = w13[order].contiguous(), w2[order].contiguous()  # row s = gpu_experts[0][s]
                ref = eager_reference(x, ids, gw, w13, w2)
                r = {"T": T}

                buf = ep.Buffer(None, plan, 0, topology="1x1", scheme="hsc", policy="tar")
                y = ep.moe(x, ids, gw, w13_local, w2_local, buffer=buf)
                be = buf._backend  # the CudaBackend the Buffer built for CUDA tensors
                r["ep_rel_l2"] = rel_l2(y, ref)
                r["ep_moe_ms"] = median_wall_ms(lambda: ep.moe(x, ids, gw, w13_local, w2_local, buffer=buf),
                                                args.warmup, args.iters)
                # check_ids=False: no host wait on one GPU (the ids' range check dropped; grace.hf's default).
                buf_nc = ep.Buffer(None, plan, 0, topology="1x1", scheme="hsc", policy="tar", check_ids=False)
                fn_nc = lambda: ep.moe(x, ids, gw, w13_local, w2_local, buffer=buf_nc)  # noqa: E731
                r["ep_nocheck_rel_l2"] = rel_l2(fn_nc(), ref)
                r["ep_nocheck_ms"] = median_wall_ms(fn_nc, args.warmup, args.iters)
                r["ep_nocheck_event_ms"] = event_ms(fn_nc, args.warmup, args.iters)
                try:
                    r["ep_graph_ms"], y_graph = graph_ms(fn_nc, args.warmup, args.iters)
                    r["ep_graph_rel_l2"] = rel_l2(y_graph, ref)
                    r["ep_graph_equal_eager"] = bool(torch.equal(y_graph, fn_nc()))
                except Exception as e:
                    r["ep_graph_error"] = repr(e)
                cap = torch.utils.dlpack.to_dlpack
                out = torch.empty((T, H), dtype=torch.float32, device=dev)
                caps = (cap(x), cap(ids32), cap(gw), cap(out))
                stream = torch.cuda.current_stream().cuda_stream
                r["ep_raw_ms"] = median_wall_ms(lambda: be._layer.forward_async(*caps, stream, 0), args.warmup,
                                                args.iters)
                r["binding_us"] = paired_overhead_us(lambda: ep.moe(x, ids, gw, w13_local, w2_local, buffer=buf),
                                                     lambda: be._layer.forward_async(*caps, stream, 0),
                                                     max(args.iters, 50))
                # The same C++ call on buf_nc's layer (no host wait): the host time the binding adds, GPU excluded.
                caps64 = (cap(x), cap(ids), cap(gw), cap(out))
                r["binding_host_us"] = paired_overhead_us(
                    fn_nc, lambda: buf_nc._backend._layer.forward_async(*caps64, stream, 0), max(args.iters, 50),
                    host_only=True)
                totals, stages = [], {}
                for _ in range(args.iters):
                    be.forward_reference(x, ids, gw, w13_local, w2_local)
                    st = be.last_stats()
                    totals.append(st["total_s"] * 1e3)
                    for key in ("routing_s", "layout_s", "dispatch_s", "expert_s", "combine_s"):
                        stages.setdefault(key[:-2] + "_ms", []).append(st[key] * 1e3)
                r["cpp_total_ms"] = statistics.median(totals)
                # Where the synchronous path's time goes (each stage synchronized; medians).
                r["cpp_stages_ms"] = {key: statistics.median(v) for key, v in stages.items()}
                try:
                    if args.grace_run_steps >= 2:
                        r["grace_run_ms"] = grace_run_ms(grace, d, f"{d}/p.json", ids_np, gw_np, name,
                                                         args.grace_run_steps)
                except subprocess.CalledProcessError as e:
                    r["grace_run_error"] = e.stderr.decode(errors="replace").strip().splitlines()[-1:]

                if vllm is not None:
                    try:
                        config, source = vllm.try_get_optimal_moe_config(w13.shape, w2.shape, k, T, device_name,
                                                                         "current")
                        fn = lambda: vllm.fused_moe_forward(x, w13, w2, gw, ids32, config)  # noqa: E731
                        r["vllm_rel_l2"] = rel_l2(fn(), ref)
                        r["vllm_config_source"] = source
                        r["vllm_ms"] = event_ms(fn, args.warmup, args.iters)
                        r["vllm_graph_ms"] = graph_ms(fn, args.warmup, args.iters)[0]
                    except Exception as e:
                        r["vllm_error"] = repr(e)
                try:
                    fn = lambda: grouped_mm_moe(x, ids, gw, w13, w2)  # noqa: E731
                    r["grouped_mm_rel_l2"] = rel_l2(fn(), ref)
                    r["grouped_mm_ms"] = event_ms(fn, args.warmup, args.iters)
                    r["grouped_mm_graph_ms"] = graph_ms(fn, args.warmup, args.iters)[0]
                except Exception as e:
                    r["grouped_mm_error"] = repr(e)

                if args.kernels:
                    r["kernels_us"] = {"ep": kernel_table(lambda: ep.moe(x, ids, gw, w13_local, w2_local, buffer=buf),
                                                          5)}
                    if "vllm_ms" in r:
                        r["kernels_us"]["vllm"] = kernel_table(
                            lambda: vllm.fused_moe_forward(x, w13, w2, gw, ids32, config), 5)
                for other in ("vllm_ms", "vllm_graph_ms", "grouped_mm_ms", "grouped_mm_graph_ms", "grace_run_ms"):
                    if other in r:
                        r[f"ratio_{other[:-3]}_over_ep"] = r[other] / r["ep_moe_ms"]
                for other in ("vllm_ms", "vllm_graph_ms"):
                    if other in r:
                        r[f"ratio_{other[:-3]}_over_ep_nocheck"] = r[other] / r["ep_nocheck_event_ms"]
                if "vllm_graph_ms" in r and "ep_graph_ms" in r:
                    r["ratio_vllm_graph_over_ep_graph"] = r["vllm_graph_ms"] / r["ep_graph_ms"]
                print(name, json.dumps(r), flush=True)
                rows.append(r)
                res["shapes"][name] = rows
                with open(args.out, "w") as f:  # rewritten after every point: partial results survive a crash
                    json.dump(res, f, indent=1)
                torch.cuda.empty_cache()
    print("\nshape          T     ep_moe  ep_raw  bind_us  cpp_total  grace_run  vllm   vllm_g  gmm    gmm_g  "
          "| vllm/ep vllm_g/ep gmm/ep run/ep | ep_nc  ep_nc_ev vllm/nc vllm_g/nc | ep_g   vllm_g/ep_g | host_us")
    for name, rows in res["shapes"].items():
        for r in rows:
            def f(key, fmt="{:7.3f}"):
                return fmt.format(r[key]) if key in r else "     - "
            print(f"{name:14s} {r['T']:5d} {f('ep_moe_ms')} {f('ep_raw_ms')} {f('binding_us', '{:7.1f}')} "
                  f"{f('cpp_total_ms')}   {f('grace_run_ms')}  {f('vllm_ms')} {f('vllm_graph_ms')} "
                  f"{f('grouped_mm_ms')} {f('grouped_mm_graph_ms')} | {f('ratio_vllm_over_ep', '{:6.2f}')} "
                  f"{f('ratio_vllm_graph_over_ep', '{:8.2f}')} {f('ratio_grouped_mm_over_ep', '{:6.2f}')} "
                  f"{f('ratio_grace_run_over_ep', '{:6.2f}')} | {f('ep_nocheck_ms')} {f('ep_nocheck_event_ms')} "
                  f"{f('ratio_vllm_over_ep_nocheck', '{:6.2f}')} {f('ratio_vllm_graph_over_ep_nocheck', '{:8.2f}')} | "
                  f"{f('ep_graph_ms')} {f('ratio_vllm_graph_over_ep_graph', '{:8.2f}')} | "
                  f"{f('binding_host_us', '{:7.1f}')}")


if __name__ == "__main__":
    main()
