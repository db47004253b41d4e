#pragma once
// Test double: G ranks as G threads of one process, exchanging through shared slots and a std::barrier.
// Host or device memory (cudaMemcpy with cudaMemcpyDefault handles both), so the CPU MoeLayer and the GPU layer
// can both run a 2x2 or 1x4 topology on one GPU and be compared rank by rank. Every collective is a lockstep
// step of all G threads (the MoE layers call every group operation on every rank in the same order).
#include <cuda_runtime.h>

#include <barrier>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "grace/communicator.hpp"
#include "grace/error.hpp"

namespace grace::test {

class ThreadHub {
  public:
    explicit ThreadHub(int n) : barrier_(n), slots_(n) {}
    struct Slot {
        const void* send = nullptr;
        const AlltoallvLayout* layout = nullptr;
        std::vector<uint64_t> u64;
        std::vector<double> dbl;
    };
    void sync() { barrier_.arrive_and_wait(); }
    Slot& slot(int r) { return slots_[r]; }

  private:
    std::barrier<> barrier_;
    std::vector<Slot> slots_;
};

class DoneRequest final : public CommRequest {
  public:
    void wait() override {}
};

class HubCommunicator final : public Communicator {
  public:
    HubCommunicator(ThreadHub& hub, const Topology& topology, int rank, MemorySpace space)
        : Communicator(topology, rank), hub_(hub), space_(space) {}
    std::string backend() const override { return space_ == MemorySpace::kDevice ? "hub-device" : "hub-host"; }
    MemorySpace memory_space() const override { return space_; }
    std::string host() const override { return "test"; }

    std::unique_ptr<CommRequest> start_alltoallv(CommGroup group, const void* send, void* recv,
                                                 const AlltoallvLayout& layout) override {
        const int n = group_size(group);
        GRACE_CHECK_ARG(static_cast<int>(layout.send_counts.size()) == n, "hub: layout size");
        hub_.slot(rank_).send = send;
        hub_.slot(rank_).layout = &layout;
        hub_.sync();
        const int mine = group == CommGroup::kGlobal ? rank_ : local_rank();
        std::string error;
        for (int q = 0; q < n; ++q) {
            const auto& peer = hub_.slot(global_rank(group, q));
            const size_t bytes = peer.layout->send_counts[mine];
            if (bytes != layout.recv_counts[q]) {
                error = cat("hub alltoallv: rank ", rank_, " expects ", layout.recv_counts[q],
                            " bytes from group rank ", q, " which sends ", bytes);
                continue;
            }
            if (bytes == 0) continue;
            const char* src = static_cast<const char*>(peer.send) + peer.layout->send_displs[mine];
            char* dst = static_cast<char*>(recv) + layout.recv_displs[q];
            if (space_ == MemorySpace::kDevice) {
                if (cudaMemcpy(dst, src, bytes, cudaMemcpyDefault) != cudaSuccess) error = "hub: cudaMemcpy failed";
            } else {
                std::memcpy(dst, src, bytes);
            }
        }
        hub_.sync();
        if (!error.empty()) throw Error(ErrorCode::kInternal, error);
        return std::make_unique<DoneRequest>();
    }
    std::vector<uint64_t> exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                          const std::vector<uint8_t>& peers) override {
        const int n = group_size(group);
        hub_.slot(rank_).u64 = send;
        hub_.sync();
        const int mine = group == CommGroup::kGlobal ? rank_ : local_rank();
        std::vector<uint64_t> out(n, 0);
        for (int q = 0; q < n; ++q)
            if (peers[q]) out[q] = hub_.slot(global_rank(group, q)).u64[mine];
        hub_.sync();
        return out;
    }
    std::vector<uint64_t> allgather(uint64_t value) override {
        hub_.slot(rank_).u64 = {value};
        hub_.sync();
        std::vector<uint64_t> out(size());
        for (int q = 0; q < size(); ++q) out[q] = hub_.slot(q).u64[0];
        hub_.sync();
        return out;
    }
    void allreduce_sum(std::vector<double>& values) override { reduce(values, false); }
    void allreduce_max(std::vector<double>& values) override { reduce(values, true); }
    void barrier() override { hub_.sync(); }
    [[noreturn]] void abort(int, const std::string& message) override { throw std::runtime_error(message); }

  private:
    void reduce(std::vector<double>& values, bool max) {
        hub_.slot(rank_).dbl = values;
        hub_.sync();
        for (size_t i = 0; i < values.size(); ++i) {
            double v = hub_.slot(0).dbl[i];
            for (int q = 1; q < size(); ++q) v = max ? std::max(v, hub_.slot(q).dbl[i]) : v + hub_.slot(q).dbl[i];
            values[i] = v;
        }
        hub_.sync();
    }
    ThreadHub& hub_;
    MemorySpace space_;
};

}  // namespace grace::test
