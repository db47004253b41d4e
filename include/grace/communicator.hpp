#pragma once
/// @file communicator.hpp
/// The collective operations the MoE layer needs, behind one abstract interface, so that the CPU reference
/// backend (MPI) and a GPU backend (NCCL: device buffers, grouped ncclSend/ncclRecv, a node communicator from
/// ncclCommSplit) plug in the same way. Backends are chosen at run time by name; asking for one that was not
/// built throws ErrorCode::kUnsupported.
///
/// Every rank of a communicator belongs to a declared topology N x M (spec §1): rank r is on node r / M with
/// local index r % M. The node is declared, not detected, so 4 processes on one machine can act as 2 x 2.
///
/// All data operations count in bytes and work on buffers in the backend's memory space (memory_space()):
/// host memory for "mpi" and "local", device memory for a GPU backend.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "grace/topology.hpp"

namespace grace {

/// Which ranks take part in a collective.
enum class CommGroup {
    kGlobal,  ///< all G ranks; group rank = global rank
    kNode,    ///< the M ranks of the caller's declared node; group rank = local index
};

/// Where the buffers passed to a communicator live.
enum class MemorySpace { kHost, kDevice };

/// A started non-blocking operation. wait() completes it (once; later calls return at once). Destroying a
/// request that was not waited for waits for it (a started collective must complete on every rank); if that
/// wait passes the communicator's deadline, the destructor ends the job (it cannot throw).
class CommRequest {
  public:
    virtual ~CommRequest() = default;
    /// Blocks until the operation has completed and its receive buffer may be read. Throws kBackend, also when
    /// the communicator's deadline (CommunicatorOptions::timeout_s) passes first; see Communicator.
    virtual void wait() = 0;
    /// Device backends: completes the operation for work queued on `stream` (a cudaStream_t; nullptr = the
    /// legacy default stream) without blocking the host: later work on `stream` runs after the exchange. No
    /// deadline applies (a peer that never answers stalls the stream, not this call). The default is wait().
    virtual void wait_on_stream(void* stream) {
        (void)stream;
        wait();
    }
};

/// Byte layout of a variable all-to-all: for each rank r of the group, `counts[r]` bytes at byte offset
/// `displs[r]` of the buffer. Sizes are the group's size.
struct AlltoallvLayout {
    std::vector<size_t> send_counts;  ///< [group size] bytes sent to each rank
    std::vector<size_t> send_displs;  ///< [group size] byte offsets into the send buffer
    std::vector<size_t> recv_counts;  ///< [group size] bytes received from each rank
    std::vector<size_t> recv_displs;  ///< [group size] byte offsets into the receive buffer
};

/// Options for make_communicator.
struct CommunicatorOptions {
    Topology topology;  ///< declared N x M; the backend's process count must equal N * M
    /// Deadline in seconds of every blocking wait (a collective, or CommRequest::wait), counted from the start
    /// of that wait; 0 = wait forever. Creating the communicator (MPI_Init, MPI_Comm_dup/split, the NCCL
    /// bootstrap) is not covered. Must be finite and >= 0 (else kInvalidArgument).
    double timeout_s = 0;
};

/// One abstract communicator: rank/size/node info, variable all-to-all (blocking and non-blocking) on the
/// global or node group, small allgather/allreduce helpers, barrier and abort.
///
/// Deadlines: with CommunicatorOptions::timeout_s > 0, a wait that does not complete in time throws
/// Error(kBackend) whose message names the operation and the rank(s) that did not answer ("mpi": every rank
/// waiting in a collective answers status queries on a side channel, so the missing ones can be named;
/// "nccl": the peers of the unfinished exchange, as NCCL cannot tell which one is missing). After such an
/// error the communicator cannot be used again (the operation is still pending): end the job with abort().
class Communicator {
  public:
    virtual ~Communicator() = default;

    /// Backend name ("mpi", "local", ...).
    virtual std::string backend() const = 0;
    /// Memory space of the buffers this backend accepts.
    virtual MemorySpace memory_space() const = 0;
    /// The declared topology.
    const Topology& topology() const { return topology_; }
    /// Global rank in [0, G).
    int rank() const { return rank_; }
    /// G = N * M.
    int size() const { return topology_.num_gpus(); }
    /// Declared node of this rank (rank / M).
    int node() const { return topology_.node_of(rank_); }
    /// Local index inside the node (rank % M).
    int local_rank() const { return topology_.local_index(rank_); }
    /// Number of ranks in `group` (G or M).
    int group_size(CommGroup group) const { return group == CommGroup::kGlobal ? size() : topology_.gpus_per_node; }
    /// Global rank of rank `r` of the caller's `group`.
    int global_rank(CommGroup group, int r) const {
        return group == CommGroup::kGlobal ? r : topology_.gpu_at(node(), r);
    }
    /// Host name of this process (for error messages).
    virtual std::string host() const = 0;

    /// Starts a variable all-to-all of bytes on `group` (MPI_Ialltoallv; grouped ncclSend/ncclRecv). Every
    /// rank of the group must call it in the same order. Pairs with zero counts exchange nothing. `send` and
    /// `recv` must stay valid until wait(). Throws kInvalidArgument for layouts of the wrong size, kBackend.
    virtual std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                         const AlltoallvLayout& layout) = 0;
    /// Device backends: the CUDA stream (cudaStream_t; nullptr = the legacy default stream, the initial value)
    /// on which the caller writes send buffers: exchanges started afterwards begin after the work queued on it.
    /// Host backends ignore it (the default does nothing).
    virtual void set_stream(void* stream) { (void)stream; }
    /// Blocking variant: start_alltoallv(...)->wait().
    void alltoallv(CommGroup group, const void* send, void* recv, const AlltoallvLayout& layout) {
        start_alltoallv(group, send, recv, layout)->wait();
    }
    /// Exchanges one 64-bit count with every rank of `group` marked in `peers` ([group size], nonzero = exchange;
    /// must be symmetric between ranks): returns [group size] with the value each peer sent (0 elsewhere).
    /// A host-memory helper for sizing receive buffers (DeepEP's notify step).
    virtual std::vector<uint64_t> exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                                  const std::vector<uint8_t>& peers) = 0;
    /// Gathers one 64-bit value from every global rank: [G]. Host memory.
    virtual std::vector<uint64_t> allgather(uint64_t value) = 0;
    /// Gathers `bytes` bytes from every global rank (the same count on all): [G * bytes], rank r's at r * bytes.
    /// Host memory. The default sends 8 bytes per allgather(uint64_t); backends override it with one call.
    virtual std::vector<uint8_t> allgather_bytes(const void* data, size_t bytes);
    /// Element-wise sum over global ranks, in place. Host memory.
    virtual void allreduce_sum(std::vector<double>& values) = 0;
    /// Element-wise max over global ranks, in place. Host memory.
    virtual void allreduce_max(std::vector<double>& values) = 0;
    /// Blocks until every global rank has reached it.
    virtual void barrier() = 0;
    /// Ends every process of the job with `code` (MPI_Abort); prints `message` first. Never returns.
    [[noreturn]] virtual void abort(int code, const std::string& message) = 0;

    /// The deadline of blocking waits in seconds (0 = none), from CommunicatorOptions::timeout_s.
    double timeout_s() const { return timeout_s_; }

  protected:
    Communicator(Topology topology, int rank, double timeout_s = 0)
        : topology_(std::move(topology)), rank_(rank), timeout_s_(timeout_s) {}
    Topology topology_;
    int rank_ = 0;
    double timeout_s_ = 0;
};

/// Creates a communicator of backend `name`: "mpi" (initializes MPI if needed; the process count must equal
/// N * M, else kInvalidArgument "topology NxM needs G processes, got P"), "local" (a single in-process rank;
/// the topology must be 1 x 1). Throws kUnsupported for a backend that was not built (e.g. "mpi" without
/// GRACE_USE_MPI, "nccl" without CUDA) and kInvalidArgument for an unknown name.
std::unique_ptr<Communicator> make_communicator(const std::string& name, const CommunicatorOptions& options);

/// Names of the backends built into this binary, e.g. {"local", "mpi"}.
std::vector<std::string> available_backends();

/// Number of processes the launcher started (MPI_COMM_WORLD size; 1 without MPI or outside mpirun), and this
/// process's index among them. Initializes MPI when built with it.
int launched_process_count();
int launched_process_rank();

/// Ends the whole launched job (MPI_Abort on MPI_COMM_WORLD when MPI is built and initialized; otherwise exits
/// this process) after printing `message` to stderr. For failures before or outside a Communicator. Never returns.
[[noreturn]] void abort_launched_job(int code, const std::string& message);

/// Host name of this process.
std::string host_name();

}  // namespace grace
