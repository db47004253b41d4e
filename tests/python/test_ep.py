"""grace.ep on CPU: the host communicator over torch.distributed (gloo on loopback, 1, 2 and 4 processes) and the
expert-parallel layer behind grace.ep.Buffer. Each multi-process case starts G worker processes of this file
(`--worker CASE RANK WORLD INIT_FILE OUT_DIR`) that rendezvous through a file:// init_method in a temp dir and write
their results there. Skips cleanly when the module was not built or torch is missing."""

import json
import os
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
from grace._grace import _ep  # noqa: E402
from grace.ep._torch_comm import TorchComm  # noqa: E402

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


def launch(case, world, arg=None):
    """Runs `case` on `world` worker processes; returns the per-rank results, or fails with their stderr."""
    with tempfile.TemporaryDirectory(prefix="grace_ep_") as tmp:
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


class HostCommunicatorTest(unittest.TestCase):
    def test_collectives_over_gloo(self):
        for world in (2, 4):
            with self.subTest(world=world):
                self.assertTrue(all(r["ok"] for r in launch("comm", world)))

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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    unittest.main()
