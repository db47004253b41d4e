"""grace.ep on CPU: the host communicator over torch.distributed (gloo on loopback) and grace.ep.Buffer on 1, 2 and 4
processes (topologies 1x1, 1x2, 2x2), all three schemes. Checked: outputs equal a float64 NumPy SwiGLU reference
(max |err| <= 1e-5 * max |ref|) and, bit for bit, the C++ MoeLayer driven in this process with G ranks as threads
over a Python hub communicator; dispatch/experts/combine equals moe bit for bit; WRR replica choices over two calls
are the ReplicaRouter's sequence; bf16 weights (cached conversion) equal their float32 values; bad inputs raise
one-line GraceErrors. Each multi-process case starts G worker processes of this file (`--worker CASE RANK WORLD
INIT_FILE OUT_DIR`) that rendezvous through a file:// init_method in a temp dir and write their results there.
Skips cleanly when the module was not built or torch is missing."""

import json
import os
import threading
import subprocess
import sys
import tempfile
import time
import traceback
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
MODULE_DIR = os.path.join(BUILD, "python")
WORKER_TIMEOUT_S = 120

if not os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    print(f"SKIP: {MODULE_DIR}/grace not built (configure with -DGRACE_BUILD_PYTHON=ON)")
    sys.exit(0)
try:
    import torch
    import torch.distributed as dist
except ImportError as e:
    print(f"SKIP: torch is not importable ({e})")
    sys.exit(0)
if not (dist.is_available() and dist.is_gloo_available()):
    print("SKIP: torch.distributed with gloo is not available")
    sys.exit(0)
sys.path.insert(0, MODULE_DIR)
import grace  # noqa: E402

if grace._EXT_ERROR is not None:
    raise SystemExit(f"grace._grace does not import: {grace._EXT_ERROR}")
import grace.ep as ep  # noqa: E402
from grace._grace import _ep  # noqa: E402
from grace.ep._torch_comm import TorchComm  # noqa: E402

E, K, H, I = 8, 3, 16, 12  # experts, top-k, hidden, intermediate
SCHEMES = ("flat", "flat-dedup", "hsc")
TOKENS = {1: [7], 2: [6, 9], 4: [6, 0, 9, 4]}  # tokens per rank (rank 1 of 4 has none)


def make_plan(world):
    """Experts 0-2 replicated (2 or 3 instances) with uneven WRR weights (period 6); the rest on one GPU."""
    n, m = _topology(world)
    instances, weights = [], []
    for e in range(E):
        inst = [e % world]
        if e < 3:
            inst += [(e + d) % world for d in range(1, min(3, world))]
        instances.append(inst)
        weights.append({1: [6], 2: [4, 2], 3: [3, 2, 1]}[len(inst)])
    gpu_experts = [sorted(e for e in range(E) if g in instances[e]) for g in range(world)]
    plan = {"format": "grace.plan/v1", "num_experts": E, "num_layers": 1, "top_k": K,
            "topology": {"nodes": n, "gpus_per_node": m, "slots_per_gpu": None}, "method": "test", "seed": 0,
            "source": "test_ep.py",
            "layers": [{"layer": 0, "gpu_experts": gpu_experts, "primary_gpu": [inst[0] for inst in instances],
                        "routing": {"policy": "wrr", "period": 6, "instances": instances, "weights": weights}}]}
    return grace.validate_plan(plan)


def all_weights():
    """w13 [E, 2I, H], w2 [E, H, I] float32, the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(E, 2 * I, H, generator=g) - 0.5) / 2, (torch.rand(E, H, I, generator=g) - 0.5) / 2


def make_tokens(world, rank, call):
    """x [T, H], topk_idx [T, K] int64 (distinct experts, some -1), topk_weights [T, K] of one rank and call."""
    T = TOKENS[world][rank]
    g = torch.Generator().manual_seed(1000 * world + 10 * rank + call)
    x = torch.rand(T, H, generator=g) * 2 - 1
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    ids = ids.to(torch.int64)
    for t in range(T):
        if t % 4 == 3:
            ids[t, 1] = -1
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def reference(x, ids, w, w13, w2):
    """float64 NumPy SwiGLU: y[t] = sum_j w[t, j] * down(silu(gate x) * up x)."""
    x, ids, w = x.double().numpy(), ids.numpy(), w.double().numpy()
    a, b = w13.double().numpy(), w2.double().numpy()
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e < 0:
                continue
            gate, up = a[e, :I] @ x[t], a[e, I:] @ x[t]
            y[t] += w[t, j] * (b[e] @ (gate / (1 + np.exp(-gate)) * up))
    return y


def local_weights(plan, rank, w13, w2):
    mine = plan["layers"][0]["gpu_experts"][rank]
    return w13[mine].contiguous(), w2[mine].contiguous()

# ---------------------------------------------------------------------------------------------------------------
# Worker cases: case(rank, world, out_dir, arg) run in a process with the default group initialised (world > 1).


def _topology(world):
    return {1: (1, 1), 2: (1, 2), 4: (2, 2)}[world]


def case_comm(rank, world, out_dir, arg):
    """Every HostCommunicator operation over TorchComm, checked against values each rank can predict."""
    n, m = _topology(world)
    comm = _ep.HostCommunicator(TorchComm(None, (n, m), 30.0), f"{n}x{m}", 30.0)
    assert (comm.rank, comm.size, comm.node, comm.local_rank) == (rank, world, rank // m, rank % m)
    assert comm.backend == "torch-gloo" and comm.topology == f"{n}x{m}", (comm.backend, comm.topology)

    def count(src, dst):  # bytes src sends to dst (some zero)
        return (src * 7 + dst * 3) % 5

    for group, size, me, members in (("global", world, rank, list(range(world))),
                                     ("node", m, rank % m, [(rank // m) * m + i for i in range(m)])):
        send = np.concatenate([np.full(count(members[me], members[q]), members[me] * 16 + members[q], np.uint8)
                               for q in range(size)]) if size else np.zeros(0, np.uint8)
        got = comm.alltoallv(group, send.astype(np.uint8), [count(members[me], members[q]) for q in range(size)],
                             [count(members[q], members[me]) for q in range(size)])
        want = np.concatenate([np.full(count(members[q], members[me]), members[q] * 16 + members[me], np.uint8)
                               for q in range(size)])
        assert np.array_equal(got, want), (group, got, want)
        # exchange_counts: symmetric peers (q + me even), value from q = 100 * q + me.
        peers = [int((q + me) % 2 == 0) for q in range(size)]
        got = comm.exchange_counts(group, [100 * me + q for q in range(size)], peers)
        assert got == [100 * q + me if peers[q] else 0 for q in range(size)], (group, got)
    big = 2**64 - 1 - rank  # above INT64_MAX: the uint64 must survive the transport
    assert comm.allgather(big) == [2**64 - 1 - r for r in range(world)]
    assert comm.allgather_bytes(b"ab" + bytes([rank])) == b"".join(b"ab" + bytes([r]) for r in range(world))
    assert comm.allreduce_sum([rank, 1.5]) == [sum(range(world)), 1.5 * world]
    assert comm.allreduce_max([rank, -rank]) == [world - 1, 0]
    comm.barrier()
    # TorchComm directly: a receive layout that is not packed (blocks in reverse rank order) and async wait.
    tc = TorchComm(None, (n, m), 30.0)
    send = np.array([rank * 10 + q for q in range(world) for _ in range(2)], np.uint8)
    recv = np.zeros(2 * world, np.uint8)
    pending = tc.alltoallv("global", send, [2] * world, [2 * q for q in range(world)], recv, [2] * world,
                           [2 * (world - 1 - q) for q in range(world)])
    pending.wait()
    pending.wait()  # a second wait returns at once
    assert recv.tolist() == [q * 10 + rank for q in reversed(range(world)) for _ in range(2)], recv
    return {"ok": True}


def case_comm_timeout(rank, world, out_dir, arg):
    """Rank 1 does not enter the collective: rank 0's wait ends at the deadline with a one-line grace error."""
    comm = _ep.HostCommunicator(TorchComm(None, (1, world), 1.0), f"1x{world}", 1.0)
    if rank == 1:
        time.sleep(4.0)  # stay alive past rank 0's deadline, so that the error is the timeout, not a closed peer
        return {"ok": True}
    t0 = time.time()
    try:
        comm.alltoallv("global", np.zeros(world, np.uint8), [1] * world, [1] * world)
    except grace.GraceError as e:
        return {"message": str(e), "waited": time.time() - t0}
    raise AssertionError("the alltoallv did not time out")


def case_layer(rank, world, out_dir, arg):
    """Per scheme, two calls of moe on one Buffer and of dispatch/experts/combine on another; saves the outputs and
    the replica choices; checks phases == moe bit for bit, bf16 weights == their float32 values, and the reference."""
    if world > 1:
        case_comm(rank, world, out_dir, arg)
    plan = make_plan(world)
    w13_all, w2_all = all_weights()
    w13, w2 = local_weights(plan, rank, w13_all, w2_all)
    result = {"max_err": 0.0, "dest": {}, "rows": {}}
    for scheme in SCHEMES:
        whole = ep.Buffer(None, plan, 0, scheme=scheme, policy="wrr", timeout=60)
        phased = ep.Buffer(None, plan, 0, scheme=scheme, policy="wrr", timeout=60)
        assert whole.local_experts == plan["layers"][0]["gpu_experts"][rank]
        assert whole.host_comm is phased.host_comm  # Buffers of one group share its gloo groups
        dests = []
        for call in range(2):
            x, ids, w = make_tokens(world, rank, call)
            y = ep.moe(x, ids, w, w13, w2, buffer=whole)
            dests.append(whole.last_dest_ranks().tolist())
            recv_x, recv_topk, recv_weights, handle = phased.dispatch(x, ids.to(torch.int32), w)
            out = phased.experts(recv_x, recv_topk, recv_weights, w13, w2)
            assert torch.equal(out, ep.experts(recv_x, recv_topk, recv_weights, w13, w2))
            # bf16 weights: converted once (cached), equal to passing their float32 values
            b13, b2 = w13.bfloat16(), w2.bfloat16()
            assert torch.equal(phased.experts(recv_x, recv_topk, recv_weights, b13, b2),
                               phased.experts(recv_x, recv_topk, recv_weights, b13.float(), b2.float()))
            y2 = phased.combine(out, handle)
            assert y.dtype == torch.float32 and tuple(y.shape) == (x.shape[0], H)
            assert torch.equal(y, y2), f"{scheme}: dispatch/experts/combine differs from moe"
            assert recv_x.shape[0] == recv_topk.shape[0] and int((recv_topk >= 0).sum()) == \
                phased.last_stats()["expert_rows"]
            ref = reference(x, ids, w, w13_all, w2_all)
            err = float(np.abs(y.double().numpy() - ref).max() / np.abs(ref).max()) if len(ref) else 0.0
            result["max_err"] = max(result["max_err"], err)
            np.save(os.path.join(out_dir, f"y.{scheme}.{call}.{rank}.npy"), y.numpy())
            result["rows"][f"{scheme}.{call}"] = int(recv_x.shape[0])
        result["dest"][scheme] = dests
    return result


class HubComm:
    """The host-communicator object of one rank of G threads in this process (lockstep, like tests/cuda's
    HubCommunicator): every collective is a barrier-separated step of all G threads."""

    name = "thread-hub"

    def __init__(self, hub, rank, world):
        self.hub, self.rank, self.size = hub, rank, world
        self.per_node = _topology(world)[1]

    def _step(self, item):
        self.hub["slots"][self.rank] = item
        self.hub["barrier"].wait()
        items = list(self.hub["slots"])
        self.hub["barrier"].wait()
        return items

    def alltoallv(self, which, send, sc, sd, recv, rc, rd):
        items = self._step((bytes(send), list(sc), list(sd)))
        node = self.rank // self.per_node
        members = list(range(self.size)) if which == "global" else \
            [node * self.per_node + i for i in range(self.per_node)]
        me = members.index(self.rank)
        for q, peer in enumerate(members):
            data, psc, psd = items[peer]
            assert psc[me] == rc[q], (psc[me], rc[q])
            recv[rd[q]:rd[q] + rc[q]] = np.frombuffer(data[psd[me]:psd[me] + psc[me]], np.uint8)
        return self

    def wait(self):
        return None

    def allgather_bytes(self, data):
        return np.frombuffer(b"".join(self._step(bytes(data))), np.uint8)

    def allreduce(self, values, op):
        items = self._step(values.copy())
        values[:] = np.sum(items, axis=0) if op == "sum" else np.max(items, axis=0)

    def barrier(self):
        self._step(None)

    def abort(self, code, message):
        raise RuntimeError(message)


def run_in_process(world, scheme):
    """The C++ MoeLayer (CpuLayer) with G ranks as threads of this process: [rank][call] -> y."""
    plan = make_plan(world)
    w13_all, w2_all = all_weights()
    hub = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    outputs, errors = [[None, None] for _ in range(world)], []

    def rank_main(rank):
        try:
            comm = _ep.HostCommunicator(HubComm(hub, rank, world), "%dx%d" % _topology(world))
            layer = _ep.CpuLayer(comm, plan, 0, None, scheme, "wrr", 0)
            w13, w2 = local_weights(plan, rank, w13_all, w2_all)
            for call in range(2):
                x, ids, w = make_tokens(world, rank, call)
                outputs[rank][call] = layer.moe(x.numpy(), ids.numpy(), w.numpy(), w13.numpy(), w2.numpy())
        except BaseException as e:  # reported by the test; the barrier's timeout stops the other threads
            errors.append(f"rank {rank}: {e!r}")
            hub["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError("; ".join(errors))
    return outputs


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def worker_main(argv):
    case, rank, world, init_file, out_dir = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    arg = json.loads(argv[5]) if len(argv) > 5 else None
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
        result = CASES[case](rank, world, out_dir, arg)
        with open(os.path.join(out_dir, f"{case}.{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)  # skip the process-group teardown (gloo groups of peers that already exited)


def launch(case, world, arg=None, out_dir=None):
    """Runs `case` on `world` worker processes (world 1: in this process, without torch.distributed); returns the
    per-rank results, or fails with their stderr. Files the workers write stay in out_dir when given."""
    if world == 1:
        return [CASES[case](0, 1, out_dir, arg)]
    with tempfile.TemporaryDirectory(prefix="grace_ep_") as tmp:
        if out_dir is not None:
            tmp = out_dir
        init_file = os.path.join(tmp, "init")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", case, str(r), str(world),
                                   init_file, tmp] + ([json.dumps(arg)] if arg is not None else []),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        logs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError(f"case {case} on {world} processes did not finish in {WORKER_TIMEOUT_S} s")
            logs.append((p.returncode, out + err))
        failed = [f"rank {r} (exit {rc}):\n{log}" for r, (rc, log) in enumerate(logs) if rc != 0]
        if failed:
            raise AssertionError(f"case {case} on {world} processes failed:\n" + "\n".join(failed))
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"{case}.{r}.json")) as f:
                results.append(json.load(f))
        return results


class LayerTest(unittest.TestCase):
    """One launch per world size runs the communicator checks (case_comm) and the layer (case_layer)."""

    def check_world(self, world):
        with tempfile.TemporaryDirectory(prefix="grace_ep_out_") as out:
            results = launch("layer", world, out_dir=out)
            plan = make_plan(world)
            for r, res in enumerate(results):
                self.assertLessEqual(res["max_err"], 1e-5, f"rank {r}")
            moved = set()
            for scheme in SCHEMES:
                # Bit for bit the C++ MoeLayer driven in this process (G ranks as threads).
                local = run_in_process(world, scheme)
                for r in range(world):
                    for call in range(2):
                        y = np.load(os.path.join(out, f"y.{scheme}.{call}.{r}.npy"))
                        self.assertEqual(y.tobytes(), local[r][call].tobytes(), f"{scheme} rank {r} call {call}")
                # WRR replica choices over two calls: the ReplicaRouter's sequence (its counters carried across).
                for r in range(world):
                    router = grace.ReplicaRouter(plan, 0, "wrr")
                    token = 0
                    for call in range(2):
                        _, ids, _ = make_tokens(world, r, call)
                        want = [router.route(r, int(e), token + t, j, K) if e >= 0 else -1
                                for t, row in enumerate(ids.tolist()) for j, e in enumerate(row)]
                        token += ids.shape[0]
                        self.assertEqual(results[r]["dest"][scheme][call], want, f"{scheme} rank {r} call {call}")
                        moved.update((int(e), d) for e, d in zip(ids.flatten().tolist(), want) if e >= 0)
            if world > 1:  # the replicated experts really went to more than one GPU
                self.assertTrue(any(len({d for e, d in moved if e == x}) > 1 for x in range(3)), moved)

    def test_world_1_topology_1x1(self):
        self.check_world(1)

    def test_world_2_topology_1x2(self):
        self.check_world(2)

    def test_world_4_topology_2x2(self):
        self.check_world(4)


class HostCommunicatorTest(unittest.TestCase):
    def test_single_process_without_torch_distributed(self):
        comm = _ep.HostCommunicator(TorchComm(None, (1, 1)), "1x1")
        self.assertEqual((comm.rank, comm.size), (0, 1))
        self.assertEqual(comm.alltoallv("global", np.arange(3, dtype=np.uint8), [3], [3]).tolist(), [0, 1, 2])
        self.assertEqual(comm.allgather(7), [7])
        self.assertEqual(comm.allreduce_sum([2.5]), [2.5])
        self.assertEqual(comm.exchange_counts("node", [5], [1]), [5])
        comm.barrier()

    def test_deadline_names_the_operation_and_rank(self):
        msg = launch("comm_timeout", 2)[0]["message"]
        self.assertTrue(msg.startswith("host communicator: alltoallv on the global group failed on rank 0: "), msg)
        self.assertIn("Timed out", msg)
        self.assertNotIn("\n", msg)

    def test_bad_topology_and_impl(self):
        with self.assertRaisesRegex(ValueError, r"^topology 2x2 needs 4 processes, the group has 1$"):
            TorchComm(None, (2, 2))

        class Fake:  # a Python object claiming 2 ranks: the C++ side checks it against the topology
            rank, size = 0, 2

        with self.assertRaisesRegex(grace.GraceError, r"^topology 1x1 needs 1 processes, the group has 2$"):
            _ep.HostCommunicator(Fake(), "1x1")
        with self.assertRaisesRegex(grace.GraceError, r"has no attribute 'size'"):
            _ep.HostCommunicator(object(), "1x1")
        with self.assertRaisesRegex(grace.GraceError, r"timeout -1 s must be finite and >= 0"):
            _ep.HostCommunicator(TorchComm(None, (1, 1)), "1x1", -1.0)

    def test_python_errors_become_one_line_grace_errors(self):
        class Broken:
            rank, size = 0, 1

            def allreduce(self, values, op):
                raise RuntimeError("link down\nsecond line")

        comm = _ep.HostCommunicator(Broken(), "1x1")
        with self.assertRaisesRegex(grace.GraceError, r"^host communicator: allreduce \(sum\) failed on rank 0: "
                                    r"link down$"):
            comm.allreduce_sum([1.0])


class BadInputTest(unittest.TestCase):
    """One-line GraceErrors (ValueError) naming the argument, raised before any communication."""

    def setUp(self):
        self.plan = make_plan(1)
        self.buf = ep.Buffer(None, self.plan, 0, scheme="hsc", policy="wrr")
        self.x, self.ids, self.w = make_tokens(1, 0, 0)
        self.w13, self.w2 = all_weights()

    def expect(self, pattern, fn):
        with self.assertRaises(ValueError) as cm:
            fn()
        msg = str(cm.exception)
        self.assertIsInstance(cm.exception, grace.GraceError)
        self.assertNotIn("\n", msg)
        self.assertRegex(msg, pattern)

    def test_tokens(self):
        b, x, ids, w = self.buf, self.x, self.ids, self.w
        self.expect(r"^x must be float32 on CPU, got float64$", lambda: b.dispatch(x.double(), ids, w))
        self.expect(r"^x must be float32 on CPU, got bfloat16$", lambda: b.moe(x.bfloat16(), ids, w, self.w13,
                                                                                self.w2))
        self.expect(r"^topk_idx must be int64 or int32, got float32$", lambda: b.dispatch(x, ids.float(), w))
        self.expect(r"^topk_weights must be float32, got float64$", lambda: b.dispatch(x, ids, w.double()))
        self.expect(r"^x must have shape \[T, H\], got \(112,\)$", lambda: b.dispatch(x.flatten(), ids, w))
        self.expect(r"^x must be contiguous", lambda: b.dispatch(torch.cat([x, x], 1)[:, ::2], ids, w))
        self.expect(r"^x \(7, 16\), topk_idx \(6, 3\) and topk_weights \(7, 3\) must be",
                    lambda: b.dispatch(x, ids[:6], w))
        bad = ids.clone()
        bad[2, 1] = E
        self.expect(r"^topk_idx\[2, 1\] = 8: expert id outside \[0, 8\) \(-1 = none\)$",
                    lambda: b.dispatch(x, bad, w))
        bad[2, 1] = -3
        self.expect(r"^topk_idx\[2, 1\] = -3: expert id outside", lambda: b.dispatch(x, bad, w))
        self.expect(r"^tensors on meta are not supported \(cpu or cuda\)$",
                    lambda: ep.Buffer(None, self.plan, 0).dispatch(x.to("meta"), ids.to("meta"), w.to("meta")))
        self.expect(r"^topk_idx is on meta, x is on cpu", lambda: b.dispatch(x, ids.to("meta"), w))
        self.expect(r"^plan must be a path, a JSON string or a dict, got int$", lambda: ep.Buffer(None, 3, 0))
        self.expect(r"^plan: '/nonexistent/plan.json' is neither a file nor a JSON object$",
                    lambda: ep.Buffer(None, "/nonexistent/plan.json", 0))

    def test_weights_rows_and_handles(self):
        b, x, ids, w = self.buf, self.x, self.ids, self.w
        rx, rt, rw, handle = b.dispatch(x, ids, w)
        self.expect(r"^w13 must be float32 or bfloat16 on CPU, got float16$",
                    lambda: b.experts(rx, rt, rw, self.w13.half(), self.w2.half()))
        self.expect(r"^w13 holds 3 experts, this rank serves 8 \(its local experts in the plan\)$",
                    lambda: b.experts(rx, rt, rw, self.w13[:3], self.w2[:3]))
        self.expect(r"^w2 must have shape \[8, 16, 12\] to match w13 \(8, 24, 16\), got \(8, 12, 16\)$",
                    lambda: b.experts(rx, rt, rw, self.w13, self.w2.transpose(1, 2).contiguous()))
        self.expect(r"^w13 and w2 must have one dtype", lambda: b.experts(rx, rt, rw, self.w13, self.w2.bfloat16()))
        self.expect(r"^recv_topk must be int32, got int64$", lambda: b.experts(rx, rt.long(), rw, self.w13, self.w2))
        bad = rt.clone()
        bad[0, 0] = 8
        self.expect(r"^recv_topk\[0, 0\] = 8 is outside \[-1, 8\)", lambda: b.experts(rx, bad, rw, self.w13, self.w2))
        out = b.experts(rx, rt, rw, self.w13, self.w2)
        self.expect(r"^expert_out must have shape \(\d+, 16\) \(the dispatch's recv_x\), got",
                    lambda: b.combine(out[1:], handle))
        other = ep.Buffer(None, self.plan, 0, scheme="hsc", policy="wrr")
        other_handle = other.dispatch(x, ids, w)[3]
        self.expect(r"^combine was given the handle of another layer's dispatch$", lambda: b.combine(out, other_handle))
        self.expect(r"^handle must come from this Buffer's dispatch on CPU, got str$", lambda: b.combine(out, "h"))
        y = b.combine(out, handle)
        self.assertEqual(tuple(y.shape), (7, H))
        self.expect(r"^combine needs the handle of a dispatch; this one was already combined$",
                    lambda: b.combine(out, handle))
        self.expect(r"^x has hidden size 8, this layer's first call had 16$",
                    lambda: b.dispatch(x[:, :8].contiguous(), ids, w))

    def test_buffer_arguments(self):
        plan = self.plan
        self.expect(r"^topology 2x2 needs 4 processes, the group has 1$", lambda: ep.Buffer(None, plan, 0,
                                                                                          topology="2x2"))
        self.expect(r"^the plan is for 8 experts, the model has num_experts=16$",
                    lambda: ep.Buffer(None, plan, 0, num_experts=16))
        self.expect(r"^layer 1 is outside \[0, 1\) \(the plan's MoE layers\)$", lambda: ep.Buffer(None, plan, 1))
        # A numpy integer is an index like any int (it was refused as 'outside [0, 1)'); a bool or a float is not.
        self.assertEqual(ep.Buffer(None, plan, np.int64(0)).layer, 0)
        self.expect(r"^layer must be an integer, got bool True$", lambda: ep.Buffer(None, plan, True))
        self.expect(r"^layer must be an integer, got float 0.0$", lambda: ep.Buffer(None, plan, 0.0))
        # seed: a uint64 (-1 and 2^64 were a multi-line pybind TypeError, 1.5 was truncated); num_experts an integer.
        self.expect(r"^seed -1 is outside \[0, 2\^64\)$", lambda: ep.Buffer(None, plan, 0, seed=-1))
        self.expect(r"^seed 18446744073709551616 is outside", lambda: ep.Buffer(None, plan, 0, seed=2**64))
        self.expect(r"^seed must be an integer, got float 1.5$", lambda: ep.Buffer(None, plan, 0, seed=1.5))
        self.assertEqual(ep.Buffer(None, plan, 0, seed=2**64 - 1).seed, 2**64 - 1)
        self.expect(r"^num_experts must be an integer, got str 'x'$",
                    lambda: ep.Buffer(None, plan, 0, num_experts="x"))
        self.expect(r"^topology \{\} must have 'nodes' and 'gpus_per_node'$",
                    lambda: ep.Buffer(None, plan, 0, topology={}))
        self.expect(r"^scheme '2dh' is not one of flat, flat-dedup, hsc$",
                    lambda: ep.Buffer(None, plan, 0, scheme="2dh"))
        self.expect(r"^timeout -1 must be a finite", lambda: ep.Buffer(None, plan, 0, timeout=-1))
        self.expect(r"^moe needs buffer=grace.ep.Buffer\(...\), got NoneType$",
                    lambda: ep.moe(self.x, self.ids, self.w, self.w13, self.w2))
        self.expect(r"routing policy", lambda: ep.Buffer(None, plan, 0, policy="fastest"))

    def test_no_copies_and_bf16_cache(self):
        b, x, ids, w = self.buf, self.x, self.ids, self.w
        rx, rt, rw, handle = b.dispatch(x, ids.to(torch.int32), w)
        out = b.experts(rx, rt, rw, self.w13, self.w2)
        # Outputs own C++ memory handed over without a copy: writable tensors that keep it alive.
        self.assertTrue(out.is_contiguous() and out.dtype == torch.float32)
        b13, b2 = self.w13.bfloat16(), self.w2.bfloat16()
        first = b.experts(rx, rt, rw, b13, b2)
        cached = b._backend._cache[-1][4]
        self.assertTrue(torch.equal(first, b.experts(rx, rt, rw, b13, b2)))
        self.assertIs(b._backend._cache[-1][4], cached)  # converted once
        b13.mul_(2)  # an in-place update bumps the version: converted again
        self.assertFalse(torch.equal(first, b.experts(rx, rt, rw, b13, b2)))
        self.assertIsNot(b._backend._cache[-1][4], cached)
        b.combine(out, handle)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    unittest.main()
