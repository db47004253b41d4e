// NCCL backend of the Communicator (device buffers). The variable all-to-all is grouped ncclSend/ncclRecv on a
// dedicated comm stream (pairs with zero bytes issue nothing, which is what makes HSC stage 1 sparse); the node
// group is a communicator from ncclCommSplit(color = declared node, key = local index). Host-side helpers
// (counts, allgather, allreduce, barrier) and the ncclUniqueId bootstrap go through a host communicator: "mpi"
// when built with MPI (one process per GPU under mpirun), else "local" (one process), or the caller's
// (grace::cuda::make_nccl_communicator: e.g. grace.ep's torch.distributed gloo groups). Exchanges start after the
// work queued on the caller's stream (set_stream) and complete either on the host (wait: polled, with the deadline)
// or on a stream (wait_on_stream: an event wait, no host block).
//
// NVLink multicast (NVLS) is always off: NCCL_NVLS_ENABLE=0 is set before ncclCommInitRank (a different value
// in the environment is overridden with a warning), so results do not depend on a feature the multi-GPU
// testbed must keep off (issue 8).
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <thread>
#include <vector>

#include "grace/communicator.hpp"
#include "grace/cuda_layer.hpp"
#include "grace/error.hpp"
#include "runtime/communicator_impl.hpp"

namespace grace::detail {

namespace {

std::string host_name() {
    char name[256] = {0};
    gethostname(name, sizeof(name) - 1);
    return name;
}

[[noreturn]] void throw_cuda(cudaError_t err, const char* call, int rank, const char* file, int line) {
    throw Error(ErrorCode::kBackend, cat("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in ",
                                         call, " on rank ", rank, " (host ", host_name(), ") at ", file, ":", line));
}

[[noreturn]] void throw_nccl(ncclResult_t res, const char* call, int rank, const char* file, int line) {
    const char* last = ncclGetLastError(nullptr);
    throw Error(ErrorCode::kBackend,
                cat("NCCL error ", ncclGetErrorString(res), " in ", call, " on rank ", rank, " (host ", host_name(),
                    ") at ", file, ":", line, last && *last ? cat(": ", last) : std::string()));
}

// `rank_for_errors_` must be in scope (the global rank, or -1 before it is known).
#define GRACE_NCCL_CUDA_CHECK(expr)                                                                     \
    do {                                                                                                \
        cudaError_t grace_e_ = (expr);                                                                  \
        if (grace_e_ != cudaSuccess) throw_cuda(grace_e_, #expr, rank_for_errors_, __FILE__, __LINE__); \
    } while (0)
#define GRACE_NCCL_CHECK(expr)                                                                          \
    do {                                                                                                \
        ncclResult_t grace_r_ = (expr);                                                                 \
        if (grace_r_ != ncclSuccess) throw_nccl(grace_r_, #expr, rank_for_errors_, __FILE__, __LINE__); \
    } while (0)

// The process's index among the processes on this machine, from the launcher (OpenMPI, MPICH/Hydra,
// MVAPICH, Slurm); the global rank when none is set.
int machine_local_rank(int global_rank) {
    for (const char* var :
         {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"})
        if (const char* v = std::getenv(var); v && *v) return std::atoi(v);
    return global_rank;
}

using Clock = std::chrono::steady_clock;

// Deadline of a wait on the GPU: polls `done` (cudaEventQuery or cudaStreamQuery) and ncclCommGetAsyncError of
// `comms`, sleeping 1 ms between polls after the first 100 ms. Returns cudaSuccess when done, the CUDA error if
// one occurs, or cudaErrorTimeout once `timeout_s` (> 0) has passed; throws on an asynchronous NCCL error.
template <class Query>
cudaError_t poll_until_done(Query done, std::initializer_list<ncclComm_t> comms, double timeout_s,
                            int rank_for_errors_) {
    const Clock::time_point t0 = Clock::now();
    for (uint64_t polls = 1;; ++polls) {
        const cudaError_t err = done();
        if (err == cudaSuccess) return cudaSuccess;
        if (err != cudaErrorNotReady) return err;
        if ((polls & 255) != 0) continue;
        for (ncclComm_t c : comms) {
            if (!c) continue;
            ncclResult_t async = ncclSuccess;
            GRACE_NCCL_CHECK(ncclCommGetAsyncError(c, &async));
            if (async != ncclSuccess && async != ncclInProgress)
                throw_nccl(async, "ncclCommGetAsyncError while waiting", rank_for_errors_, __FILE__, __LINE__);
        }
        const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
        if (timeout_s > 0 && waited >= timeout_s) return cudaErrorTimeout;
        if (waited > 0.1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

class NcclCommunicator;

class NcclRequest final : public CommRequest {
  public:
    NcclRequest(cudaEvent_t event, NcclCommunicator* owner, ncclComm_t comm, std::vector<int> peers, int rank)
        : event_(event), owner_(owner), comm_(comm), peers_(std::move(peers)), rank_for_errors_(rank) {}
    ~NcclRequest() override;
    void wait() override;
    void wait_on_stream(void* stream) override;

  private:
    cudaEvent_t event_ = nullptr;
    NcclCommunicator* owner_;  // outlives its requests
    ncclComm_t comm_ = nullptr;
    std::vector<int> peers_;  // global ranks this exchange sends to or receives from, for a timeout's message
    int rank_for_errors_ = -1;
};

class NcclCommunicator final : public Communicator {
  public:
    // `device` < 0: the machine-local rank modulo the device count; else that device (the caller's, e.g. torch's).
    NcclCommunicator(const CommunicatorOptions& options, std::shared_ptr<Communicator> host, int device = -1)
        : Communicator(options.topology, host->rank(), options.timeout_s),
          host_comm_(std::move(host)),
          host_(host_name()) {
        rank_for_errors_ = rank_;
        int devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
        // Built with CUDA but run where there is no GPU (CI): the backend is unavailable, like one not built.
        GRACE_CHECK(devices >= 1, ErrorCode::kUnsupported, "communicator backend 'nccl': no CUDA device on rank ",
                    rank_, " (host ", host_, ")");
        GRACE_CHECK_ARG(device < devices, "communicator backend 'nccl': device ", device, " on rank ", rank_,
                        " but this process sees ", devices, " CUDA device(s)");
        device_ = device >= 0 ? device : machine_local_rank(rank_) % devices;
        GRACE_NCCL_CUDA_CHECK(cudaSetDevice(device_));

        const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
        if (!nvls || std::strcmp(nvls, "0") != 0) {
            if (nvls && rank_ == 0)
                std::fprintf(stderr, "grace: NCCL_NVLS_ENABLE=%s overridden to 0 (NVLink multicast is always off)\n",
                             nvls);
            setenv("NCCL_NVLS_ENABLE", "0", 1);
        }

        // Bootstrap: rank 0's ncclUniqueId reaches every rank through the host communicator, 8 bytes at a time.
        ncclUniqueId id;
        std::memset(&id, 0, sizeof(id));
        if (rank_ == 0) GRACE_NCCL_CHECK(ncclGetUniqueId(&id));
        static_assert(sizeof(ncclUniqueId) % 8 == 0);
        for (size_t w = 0; w < sizeof(id) / 8; ++w) {
            uint64_t word = 0;
            std::memcpy(&word, id.internal + w * 8, 8);
            const auto all = host_comm_->allgather(word);
            std::memcpy(id.internal + w * 8, &all[0], 8);
        }
        GRACE_NCCL_CHECK(ncclCommInitRank(&global_, size(), id, rank_));
        GRACE_NCCL_CHECK(ncclCommSplit(global_, node(), local_rank(), &node_, nullptr));
        int n = 0, r = 0;
        GRACE_NCCL_CHECK(ncclCommCount(node_, &n));
        GRACE_NCCL_CHECK(ncclCommUserRank(node_, &r));
        GRACE_CHECK(n == topology_.gpus_per_node && r == local_rank(), ErrorCode::kInternal,
                    "ncclCommSplit gave a node "
                    "communicator of ",
                    n, " ranks with rank ", r, "; expected ", topology_.gpus_per_node, " and ", local_rank());
        GRACE_NCCL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        GRACE_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    }

    ~NcclCommunicator() override {
        if (stream_ && !broken_) cudaStreamSynchronize(stream_);
        if (node_) ncclCommDestroy(node_);
        if (global_) ncclCommDestroy(global_);
        if (ready_) cudaEventDestroy(ready_);
        if (stream_) cudaStreamDestroy(stream_);
    }

    std::string backend() const override { return "nccl"; }
    MemorySpace memory_space() const override { return MemorySpace::kDevice; }
    std::string host() const override { return host_; }

    std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                 const AlltoallvLayout& layout) override {
        const int n = group_size(group);
        check_layout(layout, n);
        ncclComm_t comm = group == CommGroup::kGlobal ? global_ : node_;
        const int self = group == CommGroup::kGlobal ? rank_ : local_rank();
        const auto* s = static_cast<const char*>(send);
        auto* r = static_cast<char*>(recv);
        // The caller wrote the send buffer on its stream (set_stream; the legacy default stream unless set).
        GRACE_NCCL_CUDA_CHECK(cudaEventRecord(ready_, user_stream_));
        GRACE_NCCL_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
        GRACE_CHECK_ARG(layout.send_counts[self] == layout.recv_counts[self], "nccl alltoallv on rank ", rank_,
                        ": sending ", layout.send_counts[self], " bytes to self but expecting ",
                        layout.recv_counts[self]);
        if (layout.send_counts[self] > 0)
            GRACE_NCCL_CUDA_CHECK(cudaMemcpyAsync(r + layout.recv_displs[self], s + layout.send_displs[self],
                                                  layout.send_counts[self], cudaMemcpyDeviceToDevice, stream_));
        std::vector<int> peers;
        GRACE_NCCL_CHECK(ncclGroupStart());
        for (int q = 0; q < n; ++q) {
            if (q == self) continue;
            if (layout.send_counts[q] > 0 || layout.recv_counts[q] > 0) peers.push_back(global_rank(group, q));
            if (layout.send_counts[q] > 0)
                GRACE_NCCL_CHECK(
                    ncclSend(s + layout.send_displs[q], layout.send_counts[q], ncclUint8, q, comm, stream_));
            if (layout.recv_counts[q] > 0)
                GRACE_NCCL_CHECK(
                    ncclRecv(r + layout.recv_displs[q], layout.recv_counts[q], ncclUint8, q, comm, stream_));
        }
        GRACE_NCCL_CHECK(ncclGroupEnd());
        cudaEvent_t done = nullptr;
        GRACE_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        GRACE_NCCL_CUDA_CHECK(cudaEventRecord(done, stream_));
        return std::make_unique<NcclRequest>(done, this, comm, std::move(peers), rank_);
    }

    void set_stream(void* stream) override { user_stream_ = static_cast<cudaStream_t>(stream); }

    std::vector<uint64_t> exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                          const std::vector<uint8_t>& peers) override {
        return host_comm_->exchange_counts(group, send, peers);
    }
    std::vector<uint64_t> allgather(uint64_t value) override { return host_comm_->allgather(value); }
    std::vector<uint8_t> allgather_bytes(const void* data, size_t bytes) override {
        return host_comm_->allgather_bytes(data, bytes);
    }
    void allreduce_sum(std::vector<double>& values) override { host_comm_->allreduce_sum(values); }
    void allreduce_max(std::vector<double>& values) override { host_comm_->allreduce_max(values); }
    void barrier() override {
        const cudaError_t err = poll_until_done([this] { return cudaStreamQuery(stream_); }, {global_, node_},
                                                timeout_s_, rank_for_errors_);
        if (err == cudaErrorTimeout) {
            abort_nccl();
            throw Error(ErrorCode::kBackend,
                        cat("timed out after ", timeout_s_, " s (--timeout) on rank ", rank_, " (host ", host_,
                            ") in barrier: this rank's NCCL exchanges did not finish (NCCL cannot name the missing "
                            "peer)"));
        }
        GRACE_NCCL_CUDA_CHECK(err);
        host_comm_->barrier();
    }
    /// After a timeout: ncclCommAbort stops the kernels still waiting for a peer, so the stream drains.
    void abort_nccl() {
        if (node_) ncclCommAbort(node_);
        if (global_) ncclCommAbort(global_);
        node_ = global_ = nullptr;
        broken_ = true;
    }
    bool broken() const { return broken_; }
    [[noreturn]] void abort(int code, const std::string& message) override {
        if (node_) ncclCommAbort(node_);
        if (global_) ncclCommAbort(global_);
        node_ = global_ = nullptr;
        host_comm_->abort(code, message);
        std::_Exit(code);  // not reached: the host communicator's abort does not return
    }

  private:
    std::shared_ptr<Communicator> host_comm_;
    std::string host_;
    int rank_for_errors_ = -1;
    int device_ = 0;
    ncclComm_t global_ = nullptr;
    ncclComm_t node_ = nullptr;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t ready_ = nullptr;
    cudaStream_t user_stream_ = nullptr;  // set_stream
    bool broken_ = false;                 // a wait timed out and the NCCL communicators were aborted
};

NcclRequest::~NcclRequest() {
    if (!event_) return;
    if (!owner_->broken()) {
        try {
            wait();
        } catch (const std::exception& e) {
            owner_->abort(1, cat("grace: error: rank ", owner_->rank(), " (host ", owner_->host(), "): ", e.what()));
        }
    }
    if (event_) cudaEventDestroy(event_);
}

void NcclRequest::wait_on_stream(void* stream) {
    if (!event_) return;
    GRACE_NCCL_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), event_, 0));
    // Destroying a recorded event is allowed: its resources are released once it completes, and the wait above
    // already holds the dependency.
    cudaEventDestroy(event_);
    event_ = nullptr;
}

void NcclRequest::wait() {
    if (!event_) return;
    const cudaError_t err = owner_->broken() ? cudaErrorTimeout
                                             : poll_until_done([this] { return cudaEventQuery(event_); }, {comm_},
                                                               owner_->timeout_s(), rank_for_errors_);
    cudaEventDestroy(event_);
    event_ = nullptr;
    if (err == cudaErrorTimeout) {
        std::string peers;
        for (int q : peers_) peers += cat(peers.empty() ? "" : ", ", q);
        owner_->abort_nccl();
        throw Error(
            ErrorCode::kBackend,
            cat("timed out after ", owner_->timeout_s(), " s (--timeout) on rank ", rank_for_errors_, " (host ",
                host_name(), ") in alltoallv: one of its peers (rank(s) ", peers.empty() ? std::string("none") : peers,
                ") did not answer; NCCL cannot tell which (ncclCommAbort called)"));
    }
    if (err != cudaSuccess) {
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(comm_, &async);
        if (async != ncclSuccess)
            throw_nccl(async, "ncclCommGetAsyncError after a failed alltoallv", rank_for_errors_, __FILE__, __LINE__);
        throw_cuda(err, "cudaEventQuery(alltoallv done)", rank_for_errors_, __FILE__, __LINE__);
    }
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const CommunicatorOptions& options) {
#ifdef GRACE_USE_MPI
    auto host =
        make_communicator(launched_process_count() > 1 || options.topology.num_gpus() > 1 ? "mpi" : "local", options);
#else
    auto host = make_communicator("local", options);
#endif
    return std::make_unique<NcclCommunicator>(options, std::shared_ptr<Communicator>(std::move(host)));
}

}  // namespace grace::detail

namespace grace::cuda {

std::unique_ptr<Communicator> make_nccl_communicator(const CommunicatorOptions& options,
                                                     std::shared_ptr<Communicator> host, int device) {
    GRACE_CHECK_ARG(host != nullptr, "nccl communicator: no host communicator given");
    GRACE_CHECK_ARG(host->memory_space() == MemorySpace::kHost, "nccl communicator: the bootstrap communicator '",
                    host->backend(), "' must work on host memory");
    GRACE_CHECK_ARG(host->topology().nodes == options.topology.nodes &&
                        host->topology().gpus_per_node == options.topology.gpus_per_node,
                    "nccl communicator: host communicator topology ", host->topology().to_string(),
                    " differs from the requested ", options.topology.to_string());
    return std::make_unique<::grace::detail::NcclCommunicator>(options, std::move(host), device);
}

}  // namespace grace::cuda
