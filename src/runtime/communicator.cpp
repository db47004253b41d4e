#include "grace/communicator.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "grace/error.hpp"
#include "runtime/communicator_impl.hpp"

namespace grace {

namespace detail {

void check_layout(const AlltoallvLayout& layout, int group_size) {
    const size_t n = static_cast<size_t>(group_size);
    GRACE_CHECK_ARG(layout.send_counts.size() == n && layout.send_displs.size() == n &&
                        layout.recv_counts.size() == n && layout.recv_displs.size() == n,
                    "alltoallv layout has ", layout.send_counts.size(), "/", layout.send_displs.size(), "/",
                    layout.recv_counts.size(), "/", layout.recv_displs.size(), " entries for a group of ", group_size);
}

}  // namespace detail

std::vector<uint8_t> Communicator::allgather_bytes(const void* data, size_t bytes) {
    const size_t words = (bytes + 7) / 8;
    std::vector<uint8_t> padded(words * 8, 0), out(static_cast<size_t>(size()) * bytes);
    if (bytes > 0) std::memcpy(padded.data(), data, bytes);
    for (size_t w = 0; w < words; ++w) {
        uint64_t word = 0;
        std::memcpy(&word, padded.data() + w * 8, 8);
        const std::vector<uint64_t> all = allgather(word);
        for (int r = 0; r < size(); ++r) {
            const size_t n = std::min<size_t>(8, bytes - w * 8);
            std::memcpy(out.data() + static_cast<size_t>(r) * bytes + w * 8, &all[r], n);
        }
    }
    return out;
}

namespace {

class DoneRequest final : public CommRequest {
  public:
    void wait() override {}
};

// A single rank in this process: every collective is a local copy. For tests and tools without MPI.
class LocalCommunicator final : public Communicator {
  public:
    explicit LocalCommunicator(const CommunicatorOptions& options)
        : Communicator(options.topology, 0, options.timeout_s) {
        const Topology& topology = options.topology;
        GRACE_CHECK_ARG(topology.num_gpus() == 1, "the local backend runs one rank; topology ", topology.to_string(),
                        " needs ", topology.num_gpus(), " processes (use the mpi backend under mpirun)");
    }
    std::string backend() const override { return "local"; }
    MemorySpace memory_space() const override { return MemorySpace::kHost; }
    std::string host() const override { return host_name(); }
    std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                 const AlltoallvLayout& layout) override {
        detail::check_layout(layout, group_size(group));
        GRACE_CHECK_ARG(layout.send_counts[0] == layout.recv_counts[0], "local alltoallv: sending ",
                        layout.send_counts[0], " bytes to self but expecting ", layout.recv_counts[0]);
        if (layout.send_counts[0] > 0)
            std::memcpy(static_cast<char*>(recv) + layout.recv_displs[0],
                        static_cast<const char*>(send) + layout.send_displs[0], layout.send_counts[0]);
        return std::make_unique<DoneRequest>();
    }
    std::vector<uint64_t> exchange_counts(CommGroup, const std::vector<uint64_t>& send,
                                          const std::vector<uint8_t>& peers) override {
        GRACE_CHECK_ARG(send.size() == 1 && peers.size() == 1, "local exchange_counts needs 1 entry");
        return {peers[0] ? send[0] : 0};
    }
    std::vector<uint64_t> allgather(uint64_t value) override { return {value}; }
    std::vector<uint8_t> allgather_bytes(const void* data, size_t bytes) override {
        const auto* p = static_cast<const uint8_t*>(data);
        return std::vector<uint8_t>(p, p + bytes);
    }
    void allreduce_sum(std::vector<double>&) override {}
    void allreduce_max(std::vector<double>&) override {}
    void barrier() override {}
    [[noreturn]] void abort(int code, const std::string& message) override {
        std::fprintf(stderr, "%s\n", message.c_str());
        std::fflush(stderr);
        std::_Exit(code);
    }
};

}  // namespace

std::unique_ptr<Communicator> make_communicator(const std::string& name, const CommunicatorOptions& options) {
    options.topology.validate();
    GRACE_CHECK_ARG(std::isfinite(options.timeout_s) && options.timeout_s >= 0, "communicator timeout ",
                    options.timeout_s, " s must be finite and >= 0 (0 = no deadline)");
    if (name == "local") return std::make_unique<LocalCommunicator>(options);
    if (name == "mpi") {
#ifdef GRACE_USE_MPI
        return detail::make_mpi_communicator(options);
#else
        throw Error(ErrorCode::kUnsupported,
                    "communicator backend 'mpi' was not built (configure with MPI found and "
                    "-DGRACE_USE_MPI=ON)");
#endif
    }
    if (name == "nccl") {
#ifdef GRACE_HAVE_NCCL
        return detail::make_nccl_communicator(options);
#else
        throw Error(ErrorCode::kUnsupported, "communicator backend 'nccl' was not built into this binary");
#endif
    }
    throw Error(ErrorCode::kInvalidArgument,
                cat("unknown communicator backend '", name, "' (known: local, mpi, nccl)"));
}

std::vector<std::string> available_backends() {
    std::vector<std::string> names{"local"};
#ifdef GRACE_USE_MPI
    names.push_back("mpi");
#endif
#ifdef GRACE_HAVE_NCCL
    names.push_back("nccl");
#endif
    return names;
}

std::string host_name() {
    char name[256] = {0};
    gethostname(name, sizeof(name) - 1);
    return name;
}

void abort_launched_job(int code, const std::string& message) {
#ifdef GRACE_USE_MPI
    detail::mpi_abort_world(code, message);
#endif
    std::fprintf(stderr, "%s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(code);
}

int launched_process_count() {
#ifdef GRACE_USE_MPI
    return detail::mpi_world_size();
#else
    return 1;
#endif
}

int launched_process_rank() {
#ifdef GRACE_USE_MPI
    return detail::mpi_world_rank();
#else
    return 0;
#endif
}

}  // namespace grace
