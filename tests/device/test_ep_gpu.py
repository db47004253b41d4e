#!/usr/bin/env python3
"""On a GPU: the CUDA backend of grace.ep (python/grace/ep/_cuda.py over grace::cuda::GpuMoeLayer).

- world of one process, topology 1x1 (one GPU: only 1x1 runs; with 2+ GPUs a 1x2 run over torch.distributed gloo
  is added, two processes, each on its own GPU);
- the binding against the C++ layer bit for bit on identical inputs: moe() (stream-ordered GpuMoeLayer::
  forward_async) == forward_reference() (GpuMoeLayer::forward_device, the synchronous path `grace run` uses),
  over two calls each so router state carries, every scheme, a device (tar) and a host (vllm) routing policy;
  dispatch + experts + combine == moe (bit for bit where a received row carries k records: hsc, flat-dedup);
- against a torch fp32 reference (bf16 x and weights upcast, fp32 math): relative L2 <= 2e-2 (the bound of
  include/grace/cuda_layer.hpp: bf16 wire and bf16 expert activations, fp32 accumulation);
- bad inputs raise ValueError (dtype, device, shape, non-contiguous, expert id >= E, handle reuse, capture in a
  CUDA graph with the id check on) and the process goes on working;
- with check_ids=False, moe captured in a CUDA graph replays bit for bit like uncaptured calls.
Run by bench/cuda/run_device_ep.sh: GRACE_BUILD_DIR=build-dev python3 -X faulthandler tests/device/test_ep_gpu.py
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch  # torch first: the device image's segfault of session 3 was at import (see run_device_ep.sh)

BUILD = os.environ.get("GRACE_BUILD_DIR", "build")
GRACE = os.path.join(BUILD, "tools", "grace", "grace")
sys.path.insert(0, os.path.join(BUILD, "python"))
from grace.ep import _cuda  # noqa: E402

REL_L2_BOUND = 2e-2
SCHEMES = ("hsc", "flat", "flat-dedup")


def sh(*args):
    subprocess.run([GRACE, *map(str, args)], check=True, capture_output=True)


def make_plan(d, preset, topology, tokens=2048):
    sh("gen", "--preset", preset, "--tokens", tokens, "--seed", 3, "-o", f"{d}/t_{preset}.npy")
    sh("plan", "--trace", f"{d}/t_{preset}.npy", "--topology", topology, "-q", "-o", f"{d}/p_{preset}_{topology}.json")
    with open(f"{d}/p_{preset}_{topology}.json") as f:
        return json.load(f)


def batch(T, E, k, H, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    scores = torch.rand(T, E, generator=g)
    scores[: T // 2, : E // 4] += 1.0  # skew: the hot experts get replicas in the plan
    ids = scores.topk(k, dim=1).indices
    ids[torch.rand(T, k, generator=g) < 0.05] = -1
    w = torch.rand(T, k, generator=g) + 0.05
    return x.to(device), ids.to(device), w.to(device)


def weights(S, H, I, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(S, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(S, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    return w13.to(device), w2.to(device)


def reference(x, ids, w, w13_all, w2_all):
    """fp32: y[t] = sum_j w[t,j] * W2_e(silu(G_e x) * U_e x), e = ids[t,j] (logical; 1x1 holds every expert)."""
    x, out = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    I = w2_all.shape[2]
    for e in range(w13_all.shape[0]):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13_all[e].float().t()
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2_all[e].float().t()
        out.index_add_(0, tok, y * w[tok, j, None])
    return out


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@unittest.skipUnless(torch.cuda.is_available() and _cuda.available(), "needs a GPU and a CUDA build of grace")
class OneGpu(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.plan = make_plan(cls.tmp.name, "olmoe", "1x1")
        cls.E, cls.k, cls.H, cls.I = 64, 8, 2048, 1024
        cls.dev = torch.device("cuda", torch.cuda.current_device())
        # 1x1: the rank holds every expert; slot s of w13/w2 is the plan's gpu_experts[0][s].
        cls.slots = cls.plan["layers"][0]["gpu_experts"][0]
        cls.w13, cls.w2 = weights(len(cls.slots), cls.H, cls.I, 11, cls.dev)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def logical_weights(self):
        """[E, ...] weights by logical expert id (for the reference)."""
        order = torch.tensor(self.slots, device=self.dev)
        w13 = torch.empty((self.E, *self.w13.shape[1:]), dtype=self.w13.dtype, device=self.dev)
        w2 = torch.empty((self.E, *self.w2.shape[1:]), dtype=self.w2.dtype, device=self.dev)
        w13[order], w2[order] = self.w13, self.w2
        return w13, w2

    def backend(self, scheme="hsc", policy="tar"):
        return _cuda.CudaBackend(self.plan, 0, "1x1", None, scheme=scheme, policy=policy, seed=5)

    def test_moe_bit_identical_to_cpp_forward_device(self):
        for scheme in SCHEMES:
            for policy in ("tar", "vllm"):
                a, b = self.backend(scheme, policy), self.backend(scheme, policy)
                for call, T in enumerate((777, 2048)):
                    x, ids, w = batch(T, self.E, self.k, self.H, 100 + call, self.dev)
                    ya = a.moe(x, ids, w, self.w13, self.w2)
                    yb = b.forward_reference(x, ids, w, self.w13, self.w2)
                    torch.cuda.synchronize()
                    self.assertTrue(torch.equal(ya, yb), f"{scheme} {policy} call {call}: "
                                    f"max diff {(ya - yb).abs().max().item()}")
                    self.assertTrue((a.last_dest_ranks() == b.last_dest_ranks()).all())

    def test_without_host_id_check(self):
        """check_ids=False (no host wait on one GPU): calls queued back to back match the checked Buffer bit for
        bit; an id >= E selects no expert (the output with -1 there) instead of raising; flat still raises."""
        for scheme in ("hsc", "flat-dedup", "flat"):
            checked = self.backend(scheme)
            unchecked = _cuda.CudaBackend(self.plan, 0, "1x1", None, scheme=scheme, seed=5, check_ids=False)
            inputs = [batch(T, self.E, self.k, self.H, 300 + call, self.dev) for call, T in enumerate((300, 2048, 77))]
            ys = [unchecked.moe(x, ids, w, self.w13, self.w2) for x, ids, w in inputs]
            torch.cuda.synchronize()
            for call, ((x, ids, w), y) in enumerate(zip(inputs, ys)):
                ref = checked.moe(x, ids, w, self.w13, self.w2)
                self.assertTrue(torch.equal(y, ref), f"{scheme} call {call}")
            x, ids, w = inputs[0]
            bad, masked = ids.clone(), ids.clone()
            bad[1, 2], masked[1, 2] = self.E, -1
            if scheme == "flat":
                with self.assertRaises(ValueError):
                    unchecked.moe(x, bad, w, self.w13, self.w2)
                continue
            y = unchecked.moe(x, bad, w, self.w13, self.w2)
            self.assertEqual(int(unchecked.last_dest_ranks().reshape(-1, self.k)[1, 2]), -1)
            ref = checked.moe(x, masked, w, self.w13, self.w2)
            self.assertTrue(torch.equal(y, ref), scheme)

    def test_moe_captured_in_cuda_graph(self):
        """check_ids=False on one GPU: moe captured by torch.cuda.graph after one uncaptured call; each replay, on new
        inputs copied into the captured tensors, equals an uncaptured Buffer's moe on them bit for bit (int64 ids from
        topk). A capture before any call, with check_ids=True, or with the flat scheme raises ValueError naming the
        reason, and the Buffer keeps working."""
        T = 512
        for scheme in ("hsc", "flat-dedup", "flat"):
            graphed = _cuda.CudaBackend(self.plan, 0, "1x1", None, scheme=scheme, seed=5, check_ids=False)
            eager = _cuda.CudaBackend(self.plan, 0, "1x1", None, scheme=scheme, seed=5, check_ids=False)
            x, ids, w = batch(T, self.E, self.k, self.H, 400, self.dev)
            with self.assertRaises(ValueError) as cm:  # no uncaptured call yet
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    graphed.moe(x, ids, w, self.w13, self.w2)
            self.assertIn("uncaptured call", str(cm.exception))
            graphed.moe(x, ids, w, self.w13, self.w2)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            if scheme == "flat":
                with self.assertRaises(ValueError) as cm:
                    with torch.cuda.graph(graph):
                        graphed.moe(x, ids, w, self.w13, self.w2)
                self.assertIn("dispatch layout is planned on the host", str(cm.exception))
                continue
            with torch.cuda.graph(graph):
                y = graphed.moe(x, ids, w, self.w13, self.w2)
            with self.assertRaises(ValueError):
                graphed.last_dest_ranks()
            for rep in range(3):
                x2, ids2, w2 = batch(T, self.E, self.k, self.H, 401 + rep, self.dev)
                x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
                graph.replay()
                ref = eager.moe(x, ids, w, self.w13, self.w2)
                torch.cuda.synchronize()
                self.assertTrue(torch.equal(y, ref), f"{scheme} replay {rep}: max diff {(y - ref).abs().max().item()}")
            print(f"  {scheme}: 3 replays of the captured moe == uncaptured moe")
        checked = self.backend("hsc")
        checked.moe(x, ids, w, self.w13, self.w2)
        with self.assertRaises(ValueError) as cm:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                checked.moe(x, ids, w, self.w13, self.w2)
        self.assertIn("range check waits on the host", str(cm.exception))
        self.assertTrue(torch.isfinite(checked.moe(x, ids, w, self.w13, self.w2)).all())

    def test_phases_match_moe(self):
        for scheme in SCHEMES:
            a, b = self.backend(scheme), self.backend(scheme)
            for call, T in enumerate((1000, 0, 513)):
                x, ids, w = batch(T, self.E, self.k, self.H, 200 + call, self.dev)
                y = a.moe(x, ids, w, self.w13, self.w2)
                rx, rt, rw, h = b.dispatch(x, ids, w)
                self.assertEqual(rx.dtype, torch.bfloat16)
                self.assertEqual(tuple(rt.shape), (rx.shape[0], self.k))
                eo = b.experts(rx, rt, rw, self.w13, self.w2)
                yp = b.combine(eo, h)
                torch.cuda.synchronize()
                self.assertEqual(tuple(yp.shape), (T, self.H))
                if T == 0:
                    continue
                if scheme == "flat":  # one record per row, padded to k columns: same sums, maybe another order
                    self.assertLess(rel_l2(yp, y), 1e-3, scheme)
                else:
                    self.assertTrue(torch.equal(yp, y), f"{scheme}: max diff {(yp - y).abs().max().item()}")

    def test_against_torch_fp32_reference(self):
        w13_all, w2_all = self.logical_weights()
        for scheme in SCHEMES:
            be = self.backend(scheme)
            x, ids, w = batch(1500, self.E, self.k, self.H, 7, self.dev)
            y = be.moe(x, ids, w, self.w13, self.w2)
            err = rel_l2(y, reference(x, ids, w, w13_all, w2_all))
            print(f"  [{scheme}] rel L2 vs torch fp32 reference: {err:.2e} (bound {REL_L2_BOUND})")
            self.assertLess(err, REL_L2_BOUND)
        # float32 x is rounded to bf16 on the way in: same as passing the bf16 tensor.
        be1, be2 = self.backend(), self.backend()
        y1 = be1.moe(x.float(), ids, w, self.w13, self.w2)
        y2 = be2.moe(x, ids.to(torch.int32), w, self.w13, self.w2)
        self.assertTrue(torch.equal(y1, y2))

    def test_bad_inputs_raise_value_error(self):
        be = self.backend()
        x, ids, w = batch(64, self.E, self.k, self.H, 9, self.dev)
        be.moe(x, ids, w, self.w13, self.w2)
        bad = ids.clone()
        bad[5, 3] = self.E
        # A contiguous view that starts 2 bytes into its storage (the kernels move rows with 16-byte accesses).
        x_odd = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
        x_odd.copy_(x)
        cases = {
            "x misaligned": lambda: be.moe(x_odd, ids, w, self.w13, self.w2),
            "x float16": lambda: be.moe(x.half(), ids, w, self.w13, self.w2),
            "x on the CPU": lambda: be.moe(x.cpu(), ids, w, self.w13, self.w2),
            "ids on the CPU": lambda: be.moe(x, ids.cpu(), w, self.w13, self.w2),
            "x not contiguous": lambda: be.moe(x.t().contiguous().t(), ids, w, self.w13, self.w2),
            "x wrong H": lambda: be.moe(x[:, :64].contiguous(), ids, w, self.w13, self.w2),
            "ids float": lambda: be.moe(x, ids.float(), w, self.w13, self.w2),
            "weights float64": lambda: be.moe(x, ids, w.double(), self.w13, self.w2),
            "weights shape": lambda: be.moe(x, ids, w[:, :4].contiguous(), self.w13, self.w2),
            "w13 float32": lambda: be.moe(x, ids, w, self.w13.float(), self.w2),
            "w2 shape": lambda: be.moe(x, ids, w, self.w13, self.w2[:, :, :512].contiguous()),
            "expert id = E": lambda: be.moe(x, bad, w, self.w13, self.w2),
            "expert id huge int64": lambda: be.moe(x, torch.full_like(ids, 2**40), w, self.w13, self.w2),
        }
        messages = {}
        for name, call in cases.items():
            with self.assertRaises(ValueError, msg=name) as cm:
                call()
            messages[name] = str(cm.exception).splitlines()[0]
            print(f"  {name}: {messages[name]}")
        self.assertIn(f"topk_idx[5, 3] = {self.E} is outside [0, {self.E})", messages["expert id = E"])
        self.assertIn(f"= {2**40} is outside", messages["expert id huge int64"])
        self.assertIn("x: starts at an address that is not a multiple of 16 bytes", messages["x misaligned"])
        # Handles: valid for one combine; a later dispatch makes an open one stale.
        rx, rt, rw, h = be.dispatch(x, ids, w)
        eo = be.experts(rx, rt, rw, self.w13, self.w2)
        be.combine(eo, h)
        with self.assertRaises(ValueError):
            be.combine(eo, h)
        _, _, _, h1 = be.dispatch(x, ids, w)
        rx, rt, rw, h2 = be.dispatch(x, ids, w)
        with self.assertRaises(ValueError):
            be.combine(eo, h1)
        be.combine(be.experts(rx, rt, rw, self.w13, self.w2), h2)
        # CUDA-graph capture is refused with a reason, not a crash.
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with self.assertRaises(ValueError):
                with torch.cuda.graph(g):
                    be.moe(x, ids, w, self.w13, self.w2)
        torch.cuda.synchronize()
        # Still works afterwards, on the same router state as a fresh backend that made the same good calls.
        y = be.moe(x, ids, w, self.w13, self.w2)
        self.assertTrue(torch.isfinite(y).all())

    def test_through_buffer_and_module_functions(self):
        """grace.ep.Buffer / grace.ep.moe / grace.ep.experts pick this backend for CUDA tensors."""
        import grace.ep as ep

        buf = ep.Buffer(None, self.plan, 0, topology="1x1", scheme="hsc", policy="tar", seed=5)
        ref = self.backend()
        for call, T in enumerate((640, 1)):
            x, ids, w = batch(T, self.E, self.k, self.H, 700 + call, self.dev)
            y = ep.moe(x, ids, w, self.w13, self.w2, buffer=buf)
            yr = ref.forward_reference(x, ids, w, self.w13, self.w2)
            torch.cuda.synchronize()
            self.assertTrue(torch.equal(y, yr), f"call {call}")
        x, ids, w = batch(300, self.E, self.k, self.H, 710, self.dev)
        rx, rt, rw, h = buf.dispatch(x, ids, w)
        eo = ep.experts(rx, rt, rw, self.w13, self.w2)
        self.assertTrue(torch.equal(eo, buf.experts(rx, rt, rw, self.w13, self.w2)))
        y = buf.combine(eo, h)
        self.assertEqual(tuple(y.shape), (300, self.H))
        self.assertEqual(y.dtype, torch.float32)

    def test_stream_ordered_on_a_side_stream(self):
        """moe() on a non-default stream gives what it gives on the default stream."""
        a, b = self.backend(), self.backend()
        x, ids, w = batch(900, self.E, self.k, self.H, 31, self.dev)
        ya = a.moe(x, ids, w, self.w13, self.w2)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            yb = b.moe(x, ids, w, self.w13, self.w2)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(ya, yb))


def _two_gpu_worker(rank, port, plan_path, q):
    """One rank of the 1x2 run: gloo group for the host side, NCCL through grace."""
    try:
        import torch.distributed as dist
        from grace.ep._torch_comm import TorchComm

        torch.cuda.set_device(rank)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        with open(plan_path) as f:
            plan = json.load(f)
        dev = torch.device("cuda", rank)
        S = len(plan["layers"][0]["gpu_experts"][rank])
        w13, w2 = weights(S, 2048, 1024, 40 + rank, dev)
        host = TorchComm(None, (1, 2), 120.0)
        a = _cuda.CudaBackend(plan, 0, "1x2", host, scheme="hsc", policy="tar")
        host_b = TorchComm(None, (1, 2), 120.0)
        b = _cuda.CudaBackend(plan, 0, "1x2", host_b, scheme="hsc", policy="tar")
        same = True
        for call, T in enumerate((600, 0 if rank else 300, 1024)):
            x, ids, w = batch(T, 64, 8, 2048, 500 + 10 * call + rank, dev)
            ya = a.moe(x, ids, w, w13, w2)
            yb = b.forward_reference(x, ids, w, w13, w2)
            torch.cuda.synchronize()
            same = same and torch.equal(ya, yb)
        dist.barrier()
        q.put((rank, same, ""))
    except Exception as e:  # reported to the parent
        q.put((rank, False, repr(e)))


@unittest.skipUnless(torch.cuda.is_available() and _cuda.available(), "needs a GPU and a CUDA build of grace")
class LargeShapes(unittest.TestCase):
    """Mixtral-8x7B's expert shape (E=8, k=2, H=4096, I=14336: the largest H and I the whole-model benchmark
    patches), small and prefill-sized T: the layer (moe) and its expert kernel alone (grace.ep.experts on every
    token's own selections) against the torch fp32 reference."""

    def test_mixtral_shape(self):
        E, k, H, I = 8, 2, 4096, 14336
        dev = torch.device("cuda", torch.cuda.current_device())
        with tempfile.TemporaryDirectory() as d:
            plan = make_plan(d, "mixtral", "1x1")
        slots = plan["layers"][0]["gpu_experts"][0]
        w13_all, w2_all = weights(E, H, I, 21, dev)
        order = torch.tensor(slots, device=dev)
        w13, w2 = w13_all[order].contiguous(), w2_all[order].contiguous()
        be = _cuda.CudaBackend(plan, 0, "1x1", None, scheme="hsc", policy="tar", seed=5)
        for T in (300, 8192, 32768):
            x, ids, w = batch(T, E, k, H, 30 + T, dev)
            ref = reference(x, ids, w, w13_all, w2_all)
            err_moe = rel_l2(be.moe(x, ids, w, w13, w2), ref)
            # The expert kernel alone: row t carries token t's selections, weights by logical id.
            err_experts = rel_l2(_cuda.experts(x, ids.to(torch.int32), w, w13_all, w2_all), ref)
            print(f"  mixtral shape T={T}: rel L2 moe {err_moe:.2e}, experts alone {err_experts:.2e}")
            self.assertLess(err_experts, REL_L2_BOUND, f"T={T}: the expert kernel")
            self.assertLess(err_moe, REL_L2_BOUND, f"T={T}: the layer")


@unittest.skipUnless(torch.cuda.is_available() and _cuda.available() and torch.cuda.device_count() >= 2,
                     "needs 2 GPUs")
class TwoGpus(unittest.TestCase):
    def test_1x2_bit_identical_to_cpp(self):
        import multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            make_plan(d, "olmoe", "1x2")
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            port = 29500 + os.getpid() % 1000
            procs = [ctx.Process(target=_two_gpu_worker, args=(r, port, f"{d}/p_olmoe_1x2.json", q))
                     for r in range(2)]
            for p in procs:
                p.start()
            results = [q.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
        for rank, same, err in sorted(results):
            self.assertEqual(err, "", f"rank {rank}")
            self.assertTrue(same, f"rank {rank}: moe != forward_reference")


if __name__ == "__main__":
    unittest.main(verbosity=2)
