// MPI backend of the Communicator: the CPU reference. Every MPI call goes through GRACE_MPI_CHECK, which
// turns a failure into grace::Error(kBackend) naming the call, the rank and the host.
// The C API only: keep OpenMPI/MPICH from pulling in their deprecated C++ bindings.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>

#include "grace/communicator.hpp"
#include "grace/error.hpp"
#include "runtime/communicator_impl.hpp"

namespace grace::detail {

namespace {

int world_rank_or_minus_one() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) return -1;
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

[[noreturn]] void throw_mpi_error(int rc, const char* call) {
    char text[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw Error(ErrorCode::kBackend, cat("MPI error in ", call, " on rank ", world_rank_or_minus_one(), " (host ",
                                         host_name(), "): ", text));
}

#define GRACE_MPI_CHECK(call)                                                    \
    do {                                                                         \
        int grace_mpi_rc_ = (call);                                              \
        if (grace_mpi_rc_ != MPI_SUCCESS) throw_mpi_error(grace_mpi_rc_, #call); \
    } while (0)

void finalize_at_exit() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
}

void ensure_initialized() {
    int initialized = 0;
    GRACE_MPI_CHECK(MPI_Initialized(&initialized));
    if (initialized) return;
    int provided = 0;
    GRACE_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    GRACE_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    std::atexit(finalize_at_exit);
}

int to_int(size_t v, const char* what) {
    GRACE_CHECK(v <= static_cast<size_t>(INT_MAX), ErrorCode::kUnsupported, "MPI alltoallv: ", what, " of ", v,
                " bytes exceeds INT_MAX; use smaller batches");
    return static_cast<int>(v);
}

class MpiRequest final : public CommRequest {
  public:
    std::vector<int> sc, sd, rc, rd;  // must outlive the non-blocking collective
    MPI_Request request = MPI_REQUEST_NULL;
    void wait() override {
        if (request == MPI_REQUEST_NULL) return;
        GRACE_MPI_CHECK(MPI_Wait(&request, MPI_STATUS_IGNORE));
    }
    ~MpiRequest() override {
        if (request != MPI_REQUEST_NULL) MPI_Wait(&request, MPI_STATUS_IGNORE);
    }
};

class MpiCommunicator final : public Communicator {
  public:
    MpiCommunicator(const Topology& topology, int rank) : Communicator(topology, rank), host_(host_name()) {
        GRACE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world_));
        GRACE_MPI_CHECK(MPI_Comm_set_errhandler(world_, MPI_ERRORS_RETURN));
        GRACE_MPI_CHECK(MPI_Comm_split(world_, topology.node_of(rank), rank, &node_));
        GRACE_MPI_CHECK(MPI_Comm_set_errhandler(node_, MPI_ERRORS_RETURN));
        int node_size = 0, node_rank = 0;
        GRACE_MPI_CHECK(MPI_Comm_size(node_, &node_size));
        GRACE_MPI_CHECK(MPI_Comm_rank(node_, &node_rank));
        GRACE_ASSERT(node_size == topology.gpus_per_node && node_rank == topology.local_index(rank));
    }
    ~MpiCommunicator() override {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized) return;
        MPI_Comm_free(&node_);
        MPI_Comm_free(&world_);
    }
    std::string backend() const override { return "mpi"; }
    MemorySpace memory_space() const override { return MemorySpace::kHost; }
    std::string host() const override { return host_; }

    std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                 const AlltoallvLayout& layout) override {
        const int n = group_size(group);
        check_layout(layout, n);
        auto req = std::make_unique<MpiRequest>();
        req->sc.resize(n), req->sd.resize(n), req->rc.resize(n), req->rd.resize(n);
        for (int r = 0; r < n; ++r) {
            req->sc[r] = to_int(layout.send_counts[r], "send count");
            req->sd[r] = to_int(layout.send_displs[r], "send offset");
            req->rc[r] = to_int(layout.recv_counts[r], "receive count");
            req->rd[r] = to_int(layout.recv_displs[r], "receive offset");
        }
        // MPI wants non-null buffers even when every count is zero, and they must differ: OpenMPI's libnbc
        // treats sendbuf == recvbuf as MPI_IN_PLACE, whose schedule does not match the other ranks' (a hang).
        static char dummy_send = 0, dummy_recv = 0;
        const void* s = send ? send : &dummy_send;
        void* r = recv ? recv : &dummy_recv;
        GRACE_CHECK_ARG(s != r, "alltoallv: send and receive buffers must differ (no in-place exchange)");
        if (std::getenv("GRACE_MPI_DEBUG")) {
            std::string line = cat("rank ", rank_, " group ", n, ":");
            for (int q = 0; q < n; ++q)
                line += cat(" [", q, "] s", req->sc[q], "@", req->sd[q], " r", req->rc[q], "@", req->rd[q]);
            std::fprintf(stderr, "%s\n", line.c_str());
        }
        GRACE_MPI_CHECK(MPI_Ialltoallv(s, req->sc.data(), req->sd.data(), MPI_BYTE, r, req->rc.data(), req->rd.data(),
                                       MPI_BYTE, comm(group), &req->request));
        return req;
    }

    std::vector<uint64_t> exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                          const std::vector<uint8_t>& peers) override {
        const int n = group_size(group);
        GRACE_CHECK_ARG(static_cast<int>(send.size()) == n && static_cast<int>(peers.size()) == n,
                        "exchange_counts needs ", n, " entries, got ", send.size(), " and ", peers.size());
        std::vector<uint64_t> recv(n, 0);
        std::vector<int> counts(n), displs(n);
        for (int r = 0; r < n; ++r) {
            counts[r] = peers[r] ? 1 : 0;
            displs[r] = r;
        }
        GRACE_MPI_CHECK(MPI_Alltoallv(send.data(), counts.data(), displs.data(), MPI_UINT64_T, recv.data(),
                                      counts.data(), displs.data(), MPI_UINT64_T, comm(group)));
        return recv;
    }

    std::vector<uint64_t> allgather(uint64_t value) override {
        std::vector<uint64_t> out(size());
        GRACE_MPI_CHECK(MPI_Allgather(&value, 1, MPI_UINT64_T, out.data(), 1, MPI_UINT64_T, world_));
        return out;
    }
    void allreduce_sum(std::vector<double>& values) override {
        GRACE_MPI_CHECK(
            MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, MPI_SUM, world_));
    }
    void allreduce_max(std::vector<double>& values) override {
        GRACE_MPI_CHECK(
            MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, MPI_MAX, world_));
    }
    void barrier() override { GRACE_MPI_CHECK(MPI_Barrier(world_)); }
    [[noreturn]] void abort(int code, const std::string& message) override {
        std::fprintf(stderr, "%s\n", message.c_str());
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, code);
        std::_Exit(code);
    }

  private:
    MPI_Comm comm(CommGroup group) const { return group == CommGroup::kGlobal ? world_ : node_; }
    std::string host_;
    MPI_Comm world_ = MPI_COMM_NULL;
    MPI_Comm node_ = MPI_COMM_NULL;
};

}  // namespace

int mpi_world_size() {
    ensure_initialized();
    int n = 0;
    GRACE_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &n));
    return n;
}

int mpi_world_rank() {
    ensure_initialized();
    int r = 0;
    GRACE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &r));
    return r;
}

void mpi_abort_world(int code, const std::string& message) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) return;
    std::fprintf(stderr, "%s\n", message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
}

std::unique_ptr<Communicator> make_mpi_communicator(const CommunicatorOptions& options) {
    const int size = mpi_world_size();
    const int rank = mpi_world_rank();
    GRACE_CHECK_ARG(size == options.topology.num_gpus(), "topology ", options.topology.to_string(), " needs ",
                    options.topology.num_gpus(), " processes, but ", size, " were started (mpirun -n ",
                    options.topology.num_gpus(), ")");
    return std::make_unique<MpiCommunicator>(options.topology, rank);
}

}  // namespace grace::detail
