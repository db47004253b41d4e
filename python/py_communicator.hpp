#pragma once
/// @file py_communicator.hpp
/// A host-memory grace::Communicator whose collectives are carried out by a Python object, so that the MoE
/// layers run over whatever transport the Python side already has (grace.ep._torch_comm.TorchComm: a
/// torch.distributed gloo group plus one subgroup per declared node).
///
/// The Python object (`impl`) provides:
///   rank, size                  int attributes: this process's rank in the group and the group size
///   name                        str attribute (optional): the backend name reported by backend()
///   alltoallv(group, send, send_counts, send_displs, recv, recv_counts, recv_displs) -> pending
///                               group "global" or "node"; send/recv: 1-D uint8 NumPy arrays that VIEW this
///                               communicator's caller buffers (no copy; valid until pending.wait() returns);
///                               counts/displs: lists of byte counts/offsets, one per group rank.
///                               pending.wait() completes the exchange (the object may have completed it
///                               already, then wait() returns at once).
///   allgather_bytes(data) -> array-like of size * len(data) uint8 (rank r's bytes at r * len(data))
///   allreduce(values, op)       values: float64 NumPy array viewing the caller's vector, reduced in place;
///                               op "sum" or "max"
///   barrier()
///   abort(code, message)        ends this process (and, where the transport can, the job); never returns
///
/// GIL: every call into `impl` acquires the GIL (py::gil_scoped_acquire), so the layer may run on a thread that
/// released it (the bindings release it around MoeLayer calls, so expert GEMMs do not hold it); the layer calls
/// the communicator from the thread that called it, i.e. the Python thread that entered the binding.
///
/// Errors: a Python exception raised by `impl` becomes grace::Error(kBackend) naming the operation, the group
/// and this rank, with the exception's first line (e.g. gloo's "Timed out ..." when the deadline passed).
/// Deadlines are enforced by `impl` (TorchComm creates its gloo groups with the timeout).

#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "grace/communicator.hpp"

namespace grace::py_bind {

class PyCommunicator final : public Communicator {
  public:
    /// Reads impl.rank and impl.size; throws kInvalidArgument if size != options.topology.num_gpus() (naming
    /// both), if rank is outside [0, size), or for a bad timeout (as make_communicator).
    PyCommunicator(pybind11::object impl, const CommunicatorOptions& options);
    ~PyCommunicator() override;
    PyCommunicator(const PyCommunicator&) = delete;
    PyCommunicator& operator=(const PyCommunicator&) = delete;

    std::string backend() const override { return name_; }
    MemorySpace memory_space() const override { return MemorySpace::kHost; }
    std::string host() const override;

    std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                 const AlltoallvLayout& layout) override;
    /// One alltoallv of 8 bytes with each marked peer.
    std::vector<uint64_t> exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                          const std::vector<uint8_t>& peers) override;
    std::vector<uint64_t> allgather(uint64_t value) override;
    std::vector<uint8_t> allgather_bytes(const void* data, size_t bytes) override;
    void allreduce_sum(std::vector<double>& values) override;
    void allreduce_max(std::vector<double>& values) override;
    void barrier() override;
    [[noreturn]] void abort(int code, const std::string& message) override;

    /// The Python object (borrowed; the caller must hold the GIL to use it).
    const pybind11::object& impl() const { return impl_; }

  private:
    void allreduce(std::vector<double>& values, const char* op);
    pybind11::object impl_;
    std::string name_;
};

}  // namespace grace::py_bind
