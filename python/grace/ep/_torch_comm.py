"""The host communicator of ``grace.ep`` over torch.distributed: the Python object that
``grace::py_bind::PyCommunicator`` (python/py_communicator.hpp) calls for every collective.

Groups. ``TorchComm(group, topology, timeout_s)`` creates its own gloo groups, with the deadline as their timeout:
a copy of ``group`` (the "global" group, so the layer's traffic never interleaves with the caller's collectives,
as MPI_Comm_dup does) and, when the topology has several nodes of several GPUs, one subgroup per declared node
(group ranks ``n*M .. n*M+M-1``). ``dist.new_group`` is collective over the default group: every process of the
default group must construct its TorchComm (i.e. its ``grace.ep.Buffer``) at the same point, and the subgroups are
created in the same order (node 0, 1, ...) on every rank. The groups are always gloo, also when the default group
is NCCL (the CUDA backend uses this object for its bootstrap and counts). A world of one process needs no
torch.distributed at all (every collective is then a local copy).

Variable all-to-all: ``dist.all_to_all_single`` on uint8 tensors with split sizes (gloo supports uneven splits in
torch 1.13). It is started with ``async_op=True`` and completed by ``pending.wait()``, so the HSC scheme's stage 1
really is in flight while the layer computes the intra-node layout. Send/receive arrays that are not packed
(displacements not the running sum of the counts) go through a packed temporary. Tensors are built with
``torch.from_numpy`` on the NumPy views the C++ side passes: no copy of the caller's buffers.

Deadline: ``timeout_s > 0`` is each group's gloo timeout; a collective that does not complete in time raises
(gloo: "Timed out ..."), which PyCommunicator turns into a grace error naming the operation and this rank; gloo
cannot tell which peer is missing. ``timeout_s == 0`` means no deadline of ours (the groups get a one-year timeout).

abort(code, message): prints the message and ends this process with ``os._exit(code)``; torch.distributed has no
job-wide abort, so the other ranks stop at their own deadline.
"""

import datetime
import os
import sys

import numpy as np

from .. import GraceError

_NO_DEADLINE = datetime.timedelta(days=365)


def _is_packed(counts, displs):
    off = 0
    for c, d in zip(counts, displs):
        if c and d != off:
            return False
        off += c
    return True


class _Done:
    """A completed exchange (single-rank groups)."""

    def wait(self):
        return None


class _Pending:
    """A started all_to_all_single: keeps the tensors alive until wait(), then unpacks a non-packed receive."""

    def __init__(self, work, keep, unpack):
        self._work = work
        self._keep = keep
        self._unpack = unpack

    def wait(self):
        if self._work is None:
            return None
        work, self._work = self._work, None
        work.wait()
        if self._unpack is not None:
            self._unpack()
        self._keep = None
        return None


class TorchComm:
    """Collectives for PyCommunicator over torch.distributed (see the module docstring).

    group: a ProcessGroup, or None for the default group (or for a single process without torch.distributed).
    topology: (N, M) with N * M == the group size. timeout_s: deadline of each collective, 0 = none.
    Attributes: rank, size (of the group), nodes, gpus_per_node, name.
    """

    name = "torch-gloo"

    def __init__(self, group, topology, timeout_s=0.0):
        nodes, per_node = int(topology[0]), int(topology[1])
        if nodes < 1 or per_node < 1:
            raise GraceError(f"topology {nodes}x{per_node}: nodes and GPUs per node must be >= 1")
        if not (timeout_s >= 0 and timeout_s != float("inf")):
            raise GraceError(f"timeout {timeout_s} s must be finite and >= 0 (0 = no deadline)")
        self.nodes, self.gpus_per_node = nodes, per_node
        self.timeout_s = float(timeout_s)
        self._global = None
        self._node = None
        try:
            import torch.distributed as dist
            initialized = dist.is_available() and dist.is_initialized()
        except ImportError:
            dist, initialized = None, False
        if not initialized:
            if group is not None:
                raise GraceError("a process group was given but torch.distributed is not initialized")
            self.rank, self.size = 0, 1
        else:
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            if self.rank < 0:
                raise GraceError("this process is not a member of the given process group")
        if nodes * per_node != self.size:
            raise GraceError(f"topology {nodes}x{per_node} needs {nodes * per_node} processes, the group has "
                             f"{self.size}")
        if self.size == 1:
            return
        self._dist = dist
        # Global ranks of the group's members, in group-rank order.
        if group is None or group is dist.group.WORLD:
            members = list(range(self.size))
        else:
            members = list(dist.get_process_group_ranks(group))
        timeout = datetime.timedelta(seconds=self.timeout_s) if self.timeout_s > 0 else _NO_DEADLINE
        self._global = dist.new_group(members, timeout=timeout, backend="gloo")
        if nodes == 1:
            self._node = self._global
        elif per_node > 1:
            my_node = self.rank // per_node
            for n in range(nodes):  # same order on every rank: new_group is collective over the default group
                g = dist.new_group(members[n * per_node:(n + 1) * per_node], timeout=timeout, backend="gloo")
                if n == my_node:
                    self._node = g

    def _group(self, which):
        if which == "global":
            return self._global, self.size
        if which == "node":
            return self._node, self.gpus_per_node
        raise GraceError(f"unknown group '{which}' (global or node)")

    def alltoallv(self, which, send, send_counts, send_displs, recv, recv_counts, recv_displs):
        """Starts the exchange; returns an object whose wait() completes it. send/recv: 1-D uint8 arrays."""
        group, n = self._group(which)
        if not (len(send_counts) == len(send_displs) == len(recv_counts) == len(recv_displs) == n):
            raise GraceError(f"alltoallv layout sizes {len(send_counts)}/{len(send_displs)}/{len(recv_counts)}/"
                             f"{len(recv_displs)} for a group of {n}")
        if n == 1:
            c, sd, rd = send_counts[0], send_displs[0], recv_displs[0]
            if c != recv_counts[0]:
                raise GraceError(f"alltoallv: sending {c} bytes to self but expecting {recv_counts[0]}")
            recv[rd:rd + c] = send[sd:sd + c]
            return _Done()
        import torch
        send_t = torch.from_numpy(send)
        recv_t = torch.from_numpy(recv)
        if _is_packed(send_counts, send_displs):
            send_p = send_t[:sum(send_counts)]
        else:
            send_p = torch.cat([send_t[d:d + c] for c, d in zip(send_counts, send_displs)])
        unpack = None
        if _is_packed(recv_counts, recv_displs):
            recv_p = recv_t[:sum(recv_counts)]
        else:
            recv_p = torch.empty(sum(recv_counts), dtype=torch.uint8)

            def unpack():
                off = 0
                for c, d in zip(recv_counts, recv_displs):
                    recv_t[d:d + c] = recv_p[off:off + c]
                    off += c
        work = self._dist.all_to_all_single(recv_p, send_p, output_split_sizes=list(recv_counts),
                                            input_split_sizes=list(send_counts), group=group, async_op=True)
        return _Pending(work, (send_t, recv_t, send_p, recv_p, send, recv), unpack)

    def allgather_bytes(self, data):
        """data: 1-D uint8 array of b bytes (the same b on every rank) -> uint8 array [size * b]."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if self.size == 1:
            return data.copy()
        import torch
        parts = [torch.empty(data.size, dtype=torch.uint8) for _ in range(self.size)]
        self._dist.all_gather(parts, torch.from_numpy(data), group=self._global)
        return torch.cat(parts).numpy()

    def allreduce(self, values, op):
        """values: float64 array, reduced in place over the group; op "sum" or "max"."""
        if op not in ("sum", "max"):
            raise GraceError(f"unknown reduction '{op}' (sum or max)")
        if self.size == 1 or values.size == 0:
            return None
        import torch
        red = self._dist.ReduceOp.SUM if op == "sum" else self._dist.ReduceOp.MAX
        self._dist.all_reduce(torch.from_numpy(values), op=red, group=self._global)
        return None

    def barrier(self):
        if self.size > 1:
            self._dist.barrier(group=self._global)

    def abort(self, code, message):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(code)
