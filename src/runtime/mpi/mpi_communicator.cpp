// MPI backend of the Communicator: the CPU reference. Every MPI call goes through GRACE_MPI_CHECK, which
// turns a failure into grace::Error(kBackend) naming the call, the rank and the host.
// The C API only: keep OpenMPI/MPICH from pulling in their deprecated C++ bindings.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <thread>

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

bool g_job_broken_at_exit();

void finalize_at_exit() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && !g_job_broken_at_exit()) MPI_Finalize();
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

// Set when a wait passed its deadline: the job is broken (a collective is still pending), so the exit path must
// not call MPI_Finalize, which would wait for the missing rank too.
bool g_job_broken = false;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Status queries on the side channel (a dup of the world communicator, so they never match a data message).
// A rank whose wait passes the deadline asks every other rank what it is doing; a rank answers while it polls
// in any wait. Ranks that do not answer within the grace period are the ones named as missing.
constexpr int kQueryTag = 1, kReplyTag = 2;

// What a rank reports about itself: [waiting (0/1), operation code, global collectives started, node ones].
struct Status {
    int64_t v[4] = {0, 0, 0, 0};
};

const char* const kOpNames[] = {"(none)",        "alltoallv",     "exchange_counts", "allgather",
                                "allreduce_sum", "allreduce_max", "barrier"};
enum Op : int {
    kOpNone = 0,
    kOpAlltoallv,
    kOpExchangeCounts,
    kOpAllgather,
    kOpAllreduceSum,
    kOpAllreduceMax,
    kOpBarrier
};

class MpiCommunicator;

class MpiRequest final : public CommRequest {
  public:
    MpiRequest(MpiCommunicator* owner, CommGroup group, uint64_t seq) : owner_(owner), group_(group), seq_(seq) {}
    std::vector<int> sc, sd, rc, rd;  // must outlive the non-blocking collective
    MPI_Request request = MPI_REQUEST_NULL;
    void wait() override;
    ~MpiRequest() override;

  private:
    MpiCommunicator* owner_;  // outlives its requests (the MoE layer finishes every exchange it starts)
    CommGroup group_;
    uint64_t seq_;
};

class MpiCommunicator final : public Communicator {
  public:
    MpiCommunicator(const Topology& topology, int rank, double timeout_s)
        : Communicator(topology, rank, timeout_s), host_(host_name()) {
        GRACE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world_));
        GRACE_MPI_CHECK(MPI_Comm_set_errhandler(world_, MPI_ERRORS_RETURN));
        GRACE_MPI_CHECK(MPI_Comm_split(world_, topology.node_of(rank), rank, &node_));
        GRACE_MPI_CHECK(MPI_Comm_set_errhandler(node_, MPI_ERRORS_RETURN));
        GRACE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &control_));
        GRACE_MPI_CHECK(MPI_Comm_set_errhandler(control_, MPI_ERRORS_RETURN));
        int node_size = 0, node_rank = 0;
        GRACE_MPI_CHECK(MPI_Comm_size(node_, &node_size));
        GRACE_MPI_CHECK(MPI_Comm_rank(node_, &node_rank));
        GRACE_ASSERT(node_size == topology.gpus_per_node && node_rank == topology.local_index(rank));
        GRACE_MPI_CHECK(MPI_Irecv(&query_in_, 1, MPI_INT, MPI_ANY_SOURCE, kQueryTag, control_, &query_req_));
    }
    ~MpiCommunicator() override {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized || g_job_broken) return;
        if (query_req_ != MPI_REQUEST_NULL) {
            MPI_Cancel(&query_req_);
            MPI_Wait(&query_req_, MPI_STATUS_IGNORE);
        }
        for (MPI_Request& r : replies_out_) MPI_Wait(&r, MPI_STATUS_IGNORE);
        MPI_Comm_free(&control_);
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
        auto req = std::make_unique<MpiRequest>(this, group, next_seq(group));
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
        const uint64_t seq = next_seq(group);
        MPI_Request req = MPI_REQUEST_NULL;
        GRACE_MPI_CHECK(MPI_Ialltoallv(send.data(), counts.data(), displs.data(), MPI_UINT64_T, recv.data(),
                                       counts.data(), displs.data(), MPI_UINT64_T, comm(group), &req));
        wait_request(&req, kOpExchangeCounts, group, seq);
        return recv;
    }

    std::vector<uint64_t> allgather(uint64_t value) override {
        std::vector<uint64_t> out(size());
        const uint64_t seq = next_seq(CommGroup::kGlobal);
        MPI_Request req = MPI_REQUEST_NULL;
        GRACE_MPI_CHECK(MPI_Iallgather(&value, 1, MPI_UINT64_T, out.data(), 1, MPI_UINT64_T, world_, &req));
        wait_request(&req, kOpAllgather, CommGroup::kGlobal, seq);
        return out;
    }
    std::vector<uint8_t> allgather_bytes(const void* data, size_t bytes) override {
        const int n = to_int(bytes, "allgather size");
        std::vector<uint8_t> out(static_cast<size_t>(size()) * bytes);
        static const char dummy = 0;
        const uint64_t seq = next_seq(CommGroup::kGlobal);
        MPI_Request req = MPI_REQUEST_NULL;
        GRACE_MPI_CHECK(MPI_Iallgather(bytes ? data : &dummy, n, MPI_BYTE, out.data(), n, MPI_BYTE, world_, &req));
        wait_request(&req, kOpAllgather, CommGroup::kGlobal, seq);
        return out;
    }
    void allreduce_sum(std::vector<double>& values) override { allreduce(values, MPI_SUM, kOpAllreduceSum); }
    void allreduce_max(std::vector<double>& values) override { allreduce(values, MPI_MAX, kOpAllreduceMax); }
    void barrier() override {
        const uint64_t seq = next_seq(CommGroup::kGlobal);
        MPI_Request req = MPI_REQUEST_NULL;
        GRACE_MPI_CHECK(MPI_Ibarrier(world_, &req));
        wait_request(&req, kOpBarrier, CommGroup::kGlobal, seq);
    }
    [[noreturn]] void abort(int code, const std::string& message) override {
        std::fprintf(stderr, "%s\n", message.c_str());
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, code);
        std::_Exit(code);
    }

    // Completes `req` (collective number `seq` of `group`, for messages), answering status queries while it
    // polls. For the first 100 ms it spins on MPI_Test as MPI_Wait would (the hot path: an exchange takes a
    // few ms), reading the clock and the query channel every 256 tests only; a longer wait is a wait for a slow
    // peer, so it sleeps 1 ms between tests. Throws kBackend naming the missing rank(s) once timeout_s passed.
    void wait_request(MPI_Request* req, Op op, CommGroup group, uint64_t seq) {
        int done = 0;
        GRACE_MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
        if (done) return;
        waiting_op_ = op;
        const Clock::time_point t0 = Clock::now();
        for (uint64_t spins = 1;; ++spins) {
            GRACE_MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
            if (done) break;
            if ((spins & 255) != 0) continue;
            answer_queries();
            const double waited = seconds_since(t0);
            if (timeout_s_ > 0 && waited >= timeout_s_) {
                waiting_op_ = kOpNone;
                *req = MPI_REQUEST_NULL;  // a pending collective cannot be cancelled: abandon it
                g_job_broken = true;
                throw Error(ErrorCode::kBackend, diagnose_timeout(op, group, seq, waited));
            }
            if (waited > 0.1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        waiting_op_ = kOpNone;
    }

  private:
    MPI_Comm comm(CommGroup group) const { return group == CommGroup::kGlobal ? world_ : node_; }
    uint64_t next_seq(CommGroup group) { return group == CommGroup::kGlobal ? ++global_seq_ : ++node_seq_; }

    void allreduce(std::vector<double>& values, MPI_Op mpi_op, Op op) {
        const uint64_t seq = next_seq(CommGroup::kGlobal);
        MPI_Request req = MPI_REQUEST_NULL;
        GRACE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, mpi_op,
                                       world_, &req));
        wait_request(&req, op, CommGroup::kGlobal, seq);
    }

    Status my_status() const {
        Status s;
        s.v[0] = waiting_op_ != kOpNone;
        s.v[1] = waiting_op_;
        s.v[2] = static_cast<int64_t>(global_seq_);
        s.v[3] = static_cast<int64_t>(node_seq_);
        return s;
    }

    // Answers every pending status query (a small eager send each; its request is completed later).
    void answer_queries() {
        for (;;) {
            int flag = 0;
            MPI_Status st;
            GRACE_MPI_CHECK(MPI_Test(&query_req_, &flag, &st));
            if (!flag) break;
            reply_buf_.push_back(my_status());
            replies_out_.emplace_back(MPI_REQUEST_NULL);
            GRACE_MPI_CHECK(MPI_Isend(reply_buf_.back().v, 4, MPI_INT64_T, st.MPI_SOURCE, kReplyTag, control_,
                                      &replies_out_.back()));
            GRACE_MPI_CHECK(MPI_Irecv(&query_in_, 1, MPI_INT, MPI_ANY_SOURCE, kQueryTag, control_, &query_req_));
        }
    }

    // After a timeout: asks every other rank for its status, waits a grace period for the answers, and returns
    // the one-line message. The lowest rank that is alive reports; the others give it time to end the job
    // first (so that the job prints one message), then report themselves.
    std::string diagnose_timeout(Op op, CommGroup group, uint64_t seq, double waited) {
        const int G = size();
        const double grace = std::min(5.0, std::max(1.0, timeout_s_));
        // Members, not locals: an answer may still arrive after this returns (the receives stay posted).
        std::vector<Status>& replies = diag_replies_;
        std::vector<MPI_Request>& recvs = diag_recvs_;
        replies.assign(G, Status{});
        recvs.assign(G, MPI_REQUEST_NULL);
        std::vector<uint8_t> answered(G, 0);
        answered[rank_] = 1;
        static const int ask = 1;
        for (int q = 0; q < G; ++q) {
            if (q == rank_) continue;
            MPI_Request send = MPI_REQUEST_NULL;
            MPI_Irecv(replies[q].v, 4, MPI_INT64_T, q, kReplyTag, control_, &recvs[q]);
            MPI_Isend(&ask, 1, MPI_INT, q, kQueryTag, control_, &send);
            MPI_Request_free(&send);  // a small eager send; nothing waits for it
        }
        const Clock::time_point t0 = Clock::now();
        int pending = G - 1;
        while (pending > 0 && seconds_since(t0) < grace) {
            answer_queries();
            for (int q = 0; q < G; ++q) {
                if (answered[q]) continue;
                int flag = 0;
                MPI_Test(&recvs[q], &flag, MPI_STATUS_IGNORE);
                if (flag) answered[q] = 1, --pending;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        std::string missing, elsewhere;
        int reporter = -1;
        for (int q = 0; q < G; ++q) {
            if (!answered[q]) {
                missing += cat(missing.empty() ? "" : ", ", q);
                continue;
            }
            if (reporter < 0) reporter = q;
            if (q == rank_) continue;
            const Status& s = replies[q];
            const int64_t their_seq = group == CommGroup::kGlobal ? s.v[2] : s.v[3];
            const bool same = s.v[0] && their_seq == static_cast<int64_t>(seq);
            if (!same)
                elsewhere += cat(elsewhere.empty() ? "" : "; ", "rank ", q, " is ",
                                 s.v[0] ? cat("waiting in ", kOpNames[s.v[1]]) : std::string("not waiting"), " after ",
                                 their_seq, " collectives");
        }
        const std::string where = cat(kOpNames[op], " (collective #", seq, " of the ",
                                      group == CommGroup::kGlobal ? "global" : "node", " group)");
        std::string msg =
            missing.empty()
                ? cat("timed out after ", waited, " s (--timeout ", timeout_s_, ") in ", where,
                      ": every rank answers but the collective does not complete (ranks call different collectives)")
                : cat("timed out after ", waited, " s (--timeout ", timeout_s_, ") in ", where, ": rank(s) ", missing,
                      " did not answer (stopped, hung or far behind)");
        if (!elsewhere.empty()) msg += cat("; ", elsewhere);
        if (reporter != rank_) {
            // A lower rank reports the same finding; wait for its abort, answering queries meanwhile.
            const Clock::time_point t1 = Clock::now();
            while (seconds_since(t1) < 2 * grace) {
                answer_queries();
                std::this_thread::sleep_for(std::chrono::milliseconds(5));
            }
        }
        return msg;
    }

    std::string host_;
    MPI_Comm world_ = MPI_COMM_NULL;
    MPI_Comm node_ = MPI_COMM_NULL;
    MPI_Comm control_ = MPI_COMM_NULL;
    uint64_t global_seq_ = 0, node_seq_ = 0;  // collectives started per group
    Op waiting_op_ = kOpNone;
    int query_in_ = 0;
    MPI_Request query_req_ = MPI_REQUEST_NULL;
    std::deque<Status> reply_buf_;  // send buffers of the answers (stable addresses)
    std::deque<MPI_Request> replies_out_;
    std::vector<Status> diag_replies_;     // answers to this rank's status queries (after a timeout)
    std::vector<MPI_Request> diag_recvs_;  // their receives

    friend class MpiRequest;
};

void MpiRequest::wait() {
    if (request == MPI_REQUEST_NULL) return;
    owner_->wait_request(&request, kOpAlltoallv, group_, seq_);
}

MpiRequest::~MpiRequest() {
    if (request == MPI_REQUEST_NULL || g_job_broken) return;  // broken: the job is being ended already
    try {
        wait();
    } catch (const std::exception& e) {
        owner_->abort(1, cat("grace: error: rank ", owner_->rank(), " (host ", owner_->host(), "): ", e.what()));
    }
}

bool g_job_broken_at_exit() { return g_job_broken; }

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
    return std::make_unique<MpiCommunicator>(options.topology, rank, options.timeout_s);
}

}  // namespace grace::detail
