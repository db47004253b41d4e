#include "grace/routing.hpp"

#include <gtest/gtest.h>

#include <map>

#include "grace/error.hpp"

namespace grace {
namespace {

TEST(SmoothWrr, MatchesNginxReferenceSequence) {
    // nginx's documented example: weights {a:5, b:1, c:1} give a a b a c a a.
    EXPECT_EQ(smooth_wrr_sequence({5, 1, 1}), (std::vector<uint8_t>{0, 0, 1, 0, 2, 0, 0}));
    EXPECT_EQ(smooth_wrr_sequence({1, 1}), (std::vector<uint8_t>{0, 1}));
    EXPECT_THROW(smooth_wrr_sequence({}), Error);
    EXPECT_THROW(smooth_wrr_sequence({2, 0}), Error);
}

TEST(RoundWeights, LargestRemainderWithMinimumOne) {
    EXPECT_EQ(round_weights({1, 1, 1}, 120), (std::vector<int>{40, 40, 40}));
    EXPECT_EQ(round_weights({1, 2}, 120), (std::vector<int>{40, 80}));
    EXPECT_EQ(round_weights({1, 1, 1}, 10), (std::vector<int>{4, 3, 3}));
    EXPECT_EQ(round_weights({100, 1}, 120), (std::vector<int>{119, 1}));
    EXPECT_EQ(round_weights({1000, 1, 1}, 5), (std::vector<int>{3, 1, 1}));
    EXPECT_THROW(round_weights({1, 1, 1}, 2), Error);
    EXPECT_THROW(round_weights({1, -1}, 10), Error);
}

// 2x2. Expert 0: instances on GPUs 0 (primary), 2, 3. Expert 1: 1 (primary), 2. Expert 2: 3 (primary), 2 with
// weights 90/30. Expert 3: 2 only.
LayerPlan hand_layer() {
    LayerPlan lp;
    lp.gpu_experts = {{0}, {1}, {0, 1, 2, 3}, {0, 2}};
    lp.primary_gpu = {0, 1, 3, 2};
    lp.finalize(4);
    lp.wrr_weights[2] = {90, 30};
    return lp;
}

TEST(ReplicaRouter, TarPrefersSameGpuThenSameNodeThenWrr) {
    LayerPlan lp = hand_layer();
    Topology topo{2, 2, std::nullopt};
    ReplicaRouter r(lp, topo, RoutingPolicy::kTar);
    // Expert 0 from GPU 1 (node 0, no local instance): node tier has only GPU 0.
    for (int i = 0; i < 5; ++i) EXPECT_EQ(r.route(1, 0, i, 0, 2), 0);
    // From GPU 2 and 3: the same-GPU instance.
    EXPECT_EQ(r.route(2, 0, 0, 0, 2), 2);
    EXPECT_EQ(r.route(3, 0, 0, 0, 2), 3);
    // Expert 1 from GPU 3: node 1 holds it on GPU 2.
    EXPECT_EQ(r.route(3, 1, 0, 0, 2), 2);
    EXPECT_EQ(r.route(0, 1, 0, 0, 2), 1);
    // Expert 2 from GPU 0: no instance on node 0, so WRR over all with 90:30 -> 3, 3, 2, 3, repeating.
    std::vector<int> picks;
    for (int i = 0; i < 8; ++i) picks.push_back(r.route(0, 2, i, 0, 2));
    EXPECT_EQ(picks, (std::vector<int>{3, 3, 2, 3, 3, 3, 2, 3}));
    EXPECT_EQ(r.wrr_offset(0, 2), 8);
}

TEST(ReplicaRouter, WrrIsPeriodicPerSourceAndExpert) {
    LayerPlan lp = hand_layer();
    Topology topo{2, 2, std::nullopt};
    ReplicaRouter r(lp, topo, RoutingPolicy::kWrr);
    std::map<int, int> counts;
    for (int i = 0; i < 120; ++i) ++counts[r.route(1, 0, i, 0, 2)];
    EXPECT_EQ(counts[0], 40);
    EXPECT_EQ(counts[2], 40);
    EXPECT_EQ(counts[3], 40);
    EXPECT_EQ(r.wrr_offset(1, 0), 0);  // wrapped after exactly one period
    EXPECT_EQ(r.wrr_offset(0, 0), 0);  // other sources untouched
    // The i-th selection equals position (offset + i) mod Q of the published sequence.
    const uint8_t* seq = r.sequence(2, 2);
    for (int i = 0; i < 130; ++i) EXPECT_EQ(r.route(2, 2, i, 0, 2), lp.instance_gpus[2][seq[i % 120]]);
    EXPECT_EQ(r.flat_sequences().size(), 4u * 4u * 120u);
}

TEST(ReplicaRouter, EcosystemPolicies) {
    LayerPlan lp = hand_layer();
    Topology topo{2, 2, std::nullopt};
    ReplicaRouter primary(lp, topo, RoutingPolicy::kPrimary);
    EXPECT_EQ(primary.route(2, 0, 5, 1, 2), 0);
    ReplicaRouter vllm(lp, topo, RoutingPolicy::kVllm);
    // vLLM: ((local token * 2654435769) mod 2^32) mod 3 over expert 0's slots 0, 2, 6 (GPUs 0, 2, 3): the hash
    // mod 3 is 0, 0, 2, 2, 1 for tokens 0..4, whatever j.
    const int want_vllm[] = {0, 0, 3, 3, 2};
    for (int t = 0; t < 5; ++t)
        for (int j = 0; j < 2; ++j) EXPECT_EQ(vllm.route(0, 0, t, j, 2), want_vllm[t]) << "token " << t;
    ReplicaRouter sg(lp, topo, RoutingPolicy::kSglangStatic, 7);
    EXPECT_EQ(sg.route(3, 0, 0, 0, 2), 3);  // same-GPU replica
    // GPU 1 lacks expert 0: _fair_choices([0, 2, 6], 1) from random.Random(42) samples slot 6 (GPU 3), fixed for
    // every token (the seed is SGLang's 42, not the plan's).
    for (int i = 0; i < 10; ++i) EXPECT_EQ(sg.route(1, 0, i, 0, 2), 3);
    ReplicaRouter dyn(lp, topo, RoutingPolicy::kSglangDynamic, 7);
    std::map<int, int> counts;
    for (int i = 0; i < 3000; ++i) ++counts[dyn.route(0, 0, i, 0, 2)];
    for (int g : {0, 2, 3}) EXPECT_NEAR(counts[g], 1000, 120);
    ReplicaRouter dyn2(lp, topo, RoutingPolicy::kSglangDynamic, 7);
    for (int i = 0; i < 50; ++i)
        EXPECT_EQ(dyn2.route(0, 0, i, 1, 2),
                  ReplicaRouter(lp, topo, RoutingPolicy::kSglangDynamic, 7).route(0, 0, i, 1, 2));
}

}  // namespace
}  // namespace grace
