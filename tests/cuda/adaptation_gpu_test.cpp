// Online adaptation on the GPU runtime (adaptation.hpp): the tables the GPU path builds equal the CPU ones.
// - GpuReplicaRouter: device-side per-instance counts (set_count_accumulation / take_counts) drive WrrAdapter, the
//   new sequences are uploaded asynchronously (set_sequences); every pick equals the CPU ReplicaRouter's under
//   the same adaptation, and the final weights and tables hash equal the replay's (replay_adaptive).
// - GpuMoeLayer on 2x2 (4 ranks as 4 threads over the ThreadHub test double, sharing the one GPU): counts summed
//   over ranks with allreduce_sum, weights set on every rank; destinations equal the CPU MoeLayer's under the
//   same adaptation, and the tables equal the replay's.
// Skips without a CUDA device.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "grace/adaptation.hpp"
#include "grace/cuda_layer.hpp"
#include "grace/cuda_moe.hpp"
#include "grace/eval.hpp"
#include "grace/experts.hpp"
#include "grace/routing.hpp"
#include "grace/runtime.hpp"
#include "hub_communicator.hpp"

namespace gc = grace::cuda;
using grace::RoutingPolicy;

namespace {

#define REQUIRE_GPU()                                                  \
    do {                                                               \
        if (!gc::device_available()) GTEST_SKIP() << "no CUDA device"; \
    } while (0)

constexpr int kE = 8, kK = 2, kT = 203, kB = 7;

// 2x2; expert e's primary on GPU (e + 1) % 4; even experts also on the next GPU and on the other node.
grace::ExpertPlan make_plan(RoutingPolicy policy) {
    grace::ExpertPlan plan;
    plan.num_experts = kE, plan.num_layers = 1, plan.top_k = kK;
    plan.topology = grace::Topology{2, 2};
    grace::LayerPlan lp;
    lp.gpu_experts.assign(4, {});
    lp.primary_gpu.resize(kE);
    for (int e = 0; e < kE; ++e) {
        const int p = (e + 1) % 4;
        lp.primary_gpu[e] = p;
        lp.gpu_experts[p].push_back(e);
        if (e % 2 == 0)
            for (int r : {(p + 1) % 4, (p + 2) % 4}) lp.gpu_experts[r].push_back(e);
    }
    for (auto& g : lp.gpu_experts) std::sort(g.begin(), g.end());
    lp.policy = policy;
    lp.finalize(kE);
    plan.layers = {lp};
    return plan;
}

// Skewed ids that drift halfway (low ids first, high ids later), no repeats within a token.
grace::RoutingTrace make_trace() {
    grace::RoutingTrace tr;
    tr.num_tokens = kT, tr.num_layers = 1, tr.top_k = kK, tr.num_experts = kE;
    std::mt19937 rng(5);
    for (int t = 0; t < kT; ++t) {
        std::vector<double> p(kE);
        for (int e = 0; e < kE; ++e) p[e] = t > kT / 2 ? (e + 1.0) * (e + 1.0) : 1.0 / ((e + 1.0) * (e + 1.0));
        std::discrete_distribution<int> d(p.begin(), p.end());
        const int a = d(rng);
        int b = d(rng);
        while (b == a) b = d(rng);
        tr.expert_ids.push_back(a), tr.expert_ids.push_back(b);
    }
    return tr;
}

int64_t block_begin(int g) { return (int64_t(g) * kT + 3) / 4; }

}  // namespace

TEST(GpuAdaptation, RouterTablesEqualCpuAndReplay) {
    REQUIRE_GPU();
    const grace::RoutingTrace trace = make_trace();
    for (auto policy : {RoutingPolicy::kWrr, RoutingPolicy::kTar})
        for (double decay : {0.0, 0.5}) {
            const grace::ExpertPlan plan = make_plan(policy);
            const grace::AdaptationOptions opt{2, kB, decay};
            const grace::AdaptiveReplay want = grace::replay_adaptive(trace, plan, {}, opt);
            ASSERT_GT(want.updates, 0);
            const grace::LayerPlan& lp = plan.layers[0];
            gc::GpuReplicaRouter gpu(gc::build_route_table(lp, plan.topology, policy));
            gpu.set_count_accumulation(true);
            grace::ReplicaRouter cpu(lp, plan.topology, policy);
            grace::WrrAdapter adapter(lp, 4, opt);
            for (int64_t b = 0; b < want.batches; ++b) {
                for (int g = 0; g < 4; ++g) {
                    const int64_t b0 = std::min(block_begin(g + 1), block_begin(g) + b * kB);
                    const int64_t b1 = std::min(block_begin(g + 1), b0 + kB);
                    if (b1 == b0) continue;
                    const std::vector<int32_t> ids(trace.expert_ids.begin() + b0 * kK,
                                                   trace.expert_ids.begin() + b1 * kK);
                    const gc::RouteResult r = gpu.route_host(g, ids, static_cast<int>(b1 - b0), kK);
                    for (size_t p = 0; p < ids.size(); ++p)
                        ASSERT_EQ(r.topk_rank[p], cpu.route(g, ids[p], b0 + int64_t(p) / kK, int(p) % kK, kK))
                            << "batch " << b << " source " << g << " selection " << p;
                }
                if (!adapter.due(b)) continue;
                const auto& w = adapter.update(gpu.take_counts());
                cpu.set_wrr_weights(w);
                const std::vector<uint8_t> seq = cpu.flat_sequences();
                gpu.set_sequences(std::vector<int32_t>(seq.begin(), seq.end()));
            }
            EXPECT_EQ(adapter.weights(), want.final_weights[0]);
            EXPECT_EQ(adapter.tables_hash(), want.layer_hashes[0]);
        }
}

TEST(GpuAdaptation, MoeLayer2x2TablesEqualReplayAndCpuLayer) {
    REQUIRE_GPU();
    const grace::RoutingTrace trace = make_trace();
    const grace::ExpertPlan plan = make_plan(RoutingPolicy::kTar);
    const grace::AdaptationOptions opt{2, kB, 0.0};
    const grace::AdaptiveReplay want = grace::replay_adaptive(trace, plan, {}, opt);
    const grace::LayerPlan& lp = plan.layers[0];
    const grace::ExpertShape shape{64, 32};
    grace::test::ThreadHub host_hub(4), dev_hub(4);
    std::vector<std::string> failures(4);
    std::vector<std::vector<std::vector<int>>> final_w(4);
    std::vector<uint64_t> hashes(4);
    std::vector<std::thread> threads;
    for (int r = 0; r < 4; ++r)
        threads.emplace_back([&, r] {
            try {
                grace::test::HubCommunicator hc(host_hub, plan.topology, r, grace::MemorySpace::kHost);
                grace::test::HubCommunicator dc(dev_hub, plan.topology, r, grace::MemorySpace::kDevice);
                std::vector<grace::ExpertWeights> w;
                for (int e : lp.gpu_experts[r]) w.push_back(grace::random_expert(9, 0, e, shape, grace::DType::kBF16));
                grace::MoeLayerOptions co;
                co.policy = RoutingPolicy::kTar;
                grace::MoeLayer cpu(lp, plan.topology, hc, w, co);
                gc::GpuMoeLayerOptions go;
                go.policy = RoutingPolicy::kTar;
                gc::GpuMoeLayer gpu(lp, plan.topology, dc, std::move(w), go);
                gpu.set_instance_counting(true);
                grace::WrrAdapter cpu_adapter(lp, 4, opt), gpu_adapter(lp, 4, opt);
                std::vector<int64_t> cpu_counts(cpu_adapter.num_instances(), 0),
                    gpu_counts(gpu_adapter.num_instances(), 0);
                for (int64_t b = 0; b < want.batches; ++b) {
                    const int64_t b0 = std::min(block_begin(r + 1), block_begin(r) + b * kB);
                    const int64_t n = std::min(block_begin(r + 1), b0 + kB) - b0;
                    const std::vector<int32_t> ids(trace.expert_ids.begin() + b0 * kK,
                                                   trace.expert_ids.begin() + (b0 + n) * kK);
                    const std::vector<float> gates(ids.size(), 0.5f), x(static_cast<size_t>(n) * 64, 0.25f);
                    cpu.forward(x, ids, gates, kK, b0);
                    gpu.forward(x, ids, gates, kK, b0);
                    if (gpu.last_dest_ranks() != cpu.last_dest_ranks())
                        failures[r] += grace::cat("batch ", b, ": destinations differ; ");
                    grace::count_instance_selections(lp, ids.data(), cpu.last_dest_ranks().data(), n, kK, cpu_counts);
                    if (!cpu_adapter.due(b)) continue;
                    gpu.take_instance_counts(gpu_counts);
                    for (auto* c : {&cpu_counts, &gpu_counts}) {
                        std::vector<double> sum(c->begin(), c->end());
                        (c == &cpu_counts ? static_cast<grace::Communicator&>(hc) : dc).allreduce_sum(sum);
                        for (size_t i = 0; i < sum.size(); ++i) (*c)[i] = static_cast<int64_t>(sum[i]);
                    }
                    if (cpu_counts != gpu_counts) failures[r] += grace::cat("batch ", b, ": counts differ; ");
                    cpu.router().set_wrr_weights(cpu_adapter.update(cpu_counts));
                    gpu.set_wrr_weights(gpu_adapter.update(gpu_counts));
                    std::fill(cpu_counts.begin(), cpu_counts.end(), 0);
                    std::fill(gpu_counts.begin(), gpu_counts.end(), 0);
                }
                final_w[r] = gpu_adapter.weights();
                hashes[r] = gpu_adapter.tables_hash();
            } catch (const std::exception& e) {
                failures[r] += e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < 4; ++r) {
        EXPECT_EQ(failures[r], "") << "rank " << r;
        EXPECT_EQ(final_w[r], want.final_weights[0]) << "rank " << r;
        EXPECT_EQ(hashes[r], want.layer_hashes[0]) << "rank " << r;
    }
}
