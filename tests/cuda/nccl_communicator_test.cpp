// The "nccl" communicator on device buffers, for any number of processes (one per GPU): run it as
// `mpirun -n G grace_nccl_tests` (G = 1 on a single-GPU machine). Topology: 2 x G/2 for even G, else 1 x G.
// Every rank sends rank q a block whose size depends on (sender, receiver), zero for some pairs (those pairs
// issue no NCCL call), filled with a byte pattern of (sender, receiver, offset); the receiver checks every byte.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>

#include "grace/communicator.hpp"
#include "grace/cuda_moe.hpp"
#include "grace/error.hpp"

namespace {

#define REQUIRE_GPU()                                                           \
    do {                                                                        \
        if (!grace::cuda::device_available()) GTEST_SKIP() << "no CUDA device"; \
    } while (0)

grace::Topology test_topology() {
    const int g = grace::launched_process_count();
    return g % 2 == 0 ? grace::Topology{2, g / 2} : grace::Topology{1, g};
}

grace::Communicator& comm() {
    static std::unique_ptr<grace::Communicator> c = grace::make_communicator("nccl", {test_topology()});
    return *c;
}

size_t block_bytes(int from, int to, int round) {
    return ((from * 7 + to * 3 + round) % 4 == 0) ? 0 : 1 + (from * 131 + to * 17 + round * 1000) % 5000;
}
unsigned char pattern(int from, int to, size_t i) { return static_cast<unsigned char>(from * 31 + to * 7 + i * 13); }

template <typename T>
struct Dev {
    T* p = nullptr;
    explicit Dev(size_t n) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess); }
    ~Dev() { cudaFree(p); }
};

// One variable all-to-all on `group`; returns the number of bytes that differed.
size_t exchange_and_check(grace::CommGroup group, int round) {
    auto& c = comm();
    const int n = c.group_size(group);
    const int me = group == grace::CommGroup::kGlobal ? c.rank() : c.local_rank();
    grace::AlltoallvLayout l;
    l.send_counts.resize(n), l.send_displs.resize(n), l.recv_counts.resize(n), l.recv_displs.resize(n);
    size_t so = 0, ro = 0;
    for (int q = 0; q < n; ++q) {
        l.send_displs[q] = so, l.send_counts[q] = block_bytes(me, q, round), so += l.send_counts[q];
        l.recv_displs[q] = ro, l.recv_counts[q] = block_bytes(q, me, round), ro += l.recv_counts[q];
    }
    std::vector<unsigned char> send(so), recv(ro, 0xAB);
    for (int q = 0; q < n; ++q)
        for (size_t i = 0; i < l.send_counts[q]; ++i) send[l.send_displs[q] + i] = pattern(me, q, i);
    Dev<unsigned char> ds(so), dr(ro);
    cudaMemcpy(ds.p, send.data(), so, cudaMemcpyHostToDevice);
    cudaMemset(dr.p, 0xAB, std::max<size_t>(1, ro));
    auto req = c.start_alltoallv(group, ds.p, dr.p, l);
    req->wait();
    req->wait();  // a second wait returns at once
    cudaMemcpy(recv.data(), dr.p, ro, cudaMemcpyDeviceToHost);
    size_t bad = 0;
    for (int q = 0; q < n; ++q)
        for (size_t i = 0; i < l.recv_counts[q]; ++i) bad += recv[l.recv_displs[q] + i] != pattern(q, me, i);
    return bad;
}

}  // namespace

TEST(NcclCommunicator, Identity) {
    REQUIRE_GPU();
    auto& c = comm();
    EXPECT_EQ(c.backend(), "nccl");
    EXPECT_EQ(c.memory_space(), grace::MemorySpace::kDevice);
    EXPECT_EQ(c.size(), grace::launched_process_count());
    EXPECT_EQ(c.rank(), grace::launched_process_rank());
    EXPECT_STREQ(std::getenv("NCCL_NVLS_ENABLE"), "0");
    const auto names = grace::available_backends();
    EXPECT_NE(std::find(names.begin(), names.end(), "nccl"), names.end());
}

TEST(NcclCommunicator, GlobalAlltoallvDeliversEveryByte) {
    REQUIRE_GPU();
    for (int round = 0; round < 4; ++round) EXPECT_EQ(exchange_and_check(grace::CommGroup::kGlobal, round), 0u);
}

TEST(NcclCommunicator, NodeAlltoallvDeliversEveryByte) {
    REQUIRE_GPU();
    for (int round = 0; round < 4; ++round) EXPECT_EQ(exchange_and_check(grace::CommGroup::kNode, round), 0u);
}

TEST(NcclCommunicator, SeveralInFlight) {
    REQUIRE_GPU();
    auto& c = comm();
    const int n = c.size();
    const size_t bytes = 1 << 16;
    Dev<unsigned char> a(bytes * n), b(bytes * n), ra(bytes * n), rb(bytes * n);
    cudaMemset(a.p, 1, bytes * n);
    cudaMemset(b.p, 2, bytes * n);
    grace::AlltoallvLayout l;
    for (int q = 0; q < n; ++q) {
        l.send_counts.push_back(bytes), l.send_displs.push_back(q * bytes);
        l.recv_counts.push_back(bytes), l.recv_displs.push_back(q * bytes);
    }
    auto r1 = c.start_alltoallv(grace::CommGroup::kGlobal, a.p, ra.p, l);
    auto r2 = c.start_alltoallv(grace::CommGroup::kGlobal, b.p, rb.p, l);
    r2->wait();
    r1->wait();
    std::vector<unsigned char> ha(bytes * n), hb(bytes * n);
    cudaMemcpy(ha.data(), ra.p, ha.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(hb.data(), rb.p, hb.size(), cudaMemcpyDeviceToHost);
    EXPECT_EQ(std::count(ha.begin(), ha.end(), 1), static_cast<long>(ha.size()));
    EXPECT_EQ(std::count(hb.begin(), hb.end(), 2), static_cast<long>(hb.size()));
}

TEST(NcclCommunicator, HostHelpers) {
    REQUIRE_GPU();
    auto& c = comm();
    const int n = c.size();
    const auto all = c.allgather(100 + c.rank());
    for (int q = 0; q < n; ++q) EXPECT_EQ(all[q], uint64_t(100 + q));
    std::vector<double> v{1.0, double(c.rank())};
    c.allreduce_sum(v);
    EXPECT_EQ(v[0], n);
    EXPECT_EQ(v[1], n * (n - 1) / 2.0);
    std::vector<uint64_t> send(n);
    std::vector<uint8_t> peers(n, 1);
    peers[c.rank()] = 0;
    for (int q = 0; q < n; ++q) send[q] = 1000 * c.rank() + q;
    const auto got = c.exchange_counts(grace::CommGroup::kGlobal, send, peers);
    for (int q = 0; q < n; ++q) EXPECT_EQ(got[q], q == c.rank() ? 0u : uint64_t(1000 * q + c.rank()));
    c.barrier();
}

TEST(NcclCommunicator, RejectsBadLayout) {
    REQUIRE_GPU();
    grace::AlltoallvLayout l;  // wrong size
    EXPECT_THROW(comm().start_alltoallv(grace::CommGroup::kGlobal, nullptr, nullptr, l), grace::Error);
}
