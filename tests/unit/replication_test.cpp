// Replication (spec §4) and routing tables (spec §5) on hand-worked examples.
#include "grace/replication.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "grace/error.hpp"

namespace grace {
namespace {

// Primaries: GPU g holds the experts listed in `groups[g]`.
LayerPlan make_layer(const std::vector<std::vector<int>>& groups, int E) {
    LayerPlan lp;
    lp.gpu_experts = groups;
    lp.primary_gpu.assign(E, -1);
    for (int g = 0; g < static_cast<int>(groups.size()); ++g)
        for (int e : groups[g]) lp.primary_gpu[e] = g;
    lp.wrr_period = 120;
    return lp;
}

TEST(Replication, EquationThreeAndSkew) {
    EXPECT_DOUBLE_EQ(load_skew({80, 20, 15, 5}), 80.0 / 30.0);
    EXPECT_EQ(replica_count(80.0 / 30.0, 4), 2);  // ceil(2.67) - 1
    EXPECT_EQ(replica_count(1.0, 4), 0);          // balanced: no replicas
    EXPECT_EQ(replica_count(1.0 + 1e-12, 4), 0);  // rounding noise does not add a replica
    EXPECT_EQ(replica_count(1.01, 4), 1);
    EXPECT_EQ(replica_count(7.5, 4), 3);  // capped at G - 1
    EXPECT_DOUBLE_EQ(load_skew({0, 0}), 1.0);
}

// E = 8 on 1x4: primaries {0,1} {2,3} {4,5} {6,7}, loads 50 30 10 10 8 7 5 0.
// Hand-worked: L = [80, 20, 15, 5], mean 30, gamma = 8/3, R = min(3, 3 - 1) = 2.
// Hot: threshold (80 - 30) * 3 / 2 = 75; prefix 50 < 75, 50 + 30 = 80 >= 75 -> {0, 1}.
// DR, expert 0 (load 50): predicted [80, 20, 15, 5] -> lowest two lacking it: GPU 3 (5), GPU 2 (15);
//   each instance carries 50/3: predicted [46.67, 20, 31.67, 21.67].
// Expert 1 (load 30): lowest two lacking it: GPU 1 (20), GPU 3 (21.67); share 10: [26.67, 30, 31.67, 31.67].
// Equation 4: L'_h = 80 - 80 + 80/3 = 26.67; L'_1 = 20 + 10; L'_2 = 15 + 50/3; L'_3 = 5 + 50/3 + 10.
TEST(Replication, DynamicHandWorked) {
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    Topology topo{1, 4, std::nullopt};
    replicate_layer(lp, load, topo, {ReplicationMethod::kDynamic, 0});
    EXPECT_NEAR(lp.gamma, 8.0 / 3.0, 1e-12);
    EXPECT_EQ(lp.num_replicas, 2);
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0, 1}));
    EXPECT_EQ(lp.gpu_load_before, (std::vector<double>{80, 20, 15, 5}));
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {1, 2, 3}, {0, 4, 5}, {0, 1, 6, 7}}));
    build_routing_tables(lp, load, 8, 4);
    const std::vector<double> expect = {80.0 / 3, 30, 15 + 50.0 / 3, 5 + 50.0 / 3 + 10};
    for (int g = 0; g < 4; ++g) EXPECT_NEAR(lp.predicted_gpu_load[g], expect[g], 1e-9) << g;
    EXPECT_EQ(lp.instance_gpus[0], (std::vector<int>{0, 2, 3}));
    EXPECT_EQ(lp.instance_gpus[1], (std::vector<int>{0, 1, 3}));
    // WRR, expert 0: 1/26.67 : 1/31.67 : 1/31.67 -> 44.71, 37.65, 37.65 of 120 -> floors 44 37 37 (118), the two
    // largest remainders (.706, then .647 at the lower index) get +1 -> 45 38 37.
    EXPECT_EQ(lp.wrr_weights[0], (std::vector<int>{45, 38, 37}));
    // Expert 1: 1/26.67 : 1/30 : 1/31.67 -> 43.94, 39.06, 37.00 -> 43 39 37 (119) + 1 to the first -> 44 39 37.
    EXPECT_EQ(lp.wrr_weights[1], (std::vector<int>{44, 39, 37}));
    // Independent check of the proportions.
    for (int e : {0, 1}) {
        double s = 0;
        for (int g : lp.instance_gpus[e]) s += 1.0 / expect[g];
        for (size_t j = 0; j < lp.instance_gpus[e].size(); ++j)
            EXPECT_NEAR(lp.wrr_weights[e][j], 120.0 / expect[lp.instance_gpus[e][j]] / s, 1.0);
    }
    EXPECT_EQ(lp.wrr_weights[2], (std::vector<int>{120}));
}

// Ties on predicted load go to the heavy GPU's node first, then to the lower index.
// Iterated DR, hand-worked on 1x4: primaries {0,1} {2,3} {4,5} {6,7}, loads 60 0 40 0 10 0 10 0 (mean 30).
// Round 1 = DR: gamma 2, R 1, hot {0} (60 >= (60-30)*2); e0 -> GPU 2 (10, tie with GPU 3, lower index):
//   predicted [30, 40, 40, 10] (each instance of e takes load/instances).
// Round 2: heaviest GPU 1 (40, first max), skew 4/3 -> R 1, hot {2} (40 >= (40-30)*2); e2 -> GPU 3 (10):
//   [30, 20, 40, 30], sum of squares 3800 < 4200: kept.
// Round 3: heaviest GPU 2, hot {0}; e0 -> GPU 1 (20): [20, 40, 30, 30], sum of squares 3800, not lower: undone.
TEST(Replication, DynamicIterativeHandWorked) {
    const std::vector<double> load = {60, 0, 40, 0, 10, 0, 10, 0};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    replicate_layer(lp, load, Topology{1, 4, std::nullopt}, {ReplicationMethod::kDynamicIterative, 0});
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {0, 4, 5}, {2, 6, 7}}));
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0, 2}));
    EXPECT_EQ(lp.num_replicas, 1);
    EXPECT_EQ(lp.primary_gpu, (std::vector<int>{0, 0, 1, 1, 2, 2, 3, 3}));
    // Plain DR stops after round 1.
    LayerPlan dr = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    replicate_layer(dr, load, Topology{1, 4, std::nullopt}, {ReplicationMethod::kDynamic, 0});
    EXPECT_EQ(dr.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {0, 4, 5}, {6, 7}}));
    // On the DR hand-worked example the second round would raise the spread, so the result equals DR's.
    const std::vector<double> load2 = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan a = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8), b = a;
    replicate_layer(a, load2, Topology{1, 4, std::nullopt}, {ReplicationMethod::kDynamic, 0});
    replicate_layer(b, load2, Topology{1, 4, std::nullopt}, {ReplicationMethod::kDynamicIterative, 0});
    EXPECT_EQ(a.gpu_experts, b.gpu_experts);
    EXPECT_EQ(parse_replication_method("dynamic-iter"), ReplicationMethod::kDynamicIterative);
}

TEST(Replication, DynamicTiesPreferSameNode) {
    // 2x2: GPU 0 {0, 1} heavy (60 + 0), GPUs 1, 2, 3 each 10. mean 22.5, gamma 2.67, R = 2;
    // threshold (60 - 22.5) * 3 / 2 = 56.25 -> hot {0}; targets: GPU 1 (same node), then GPU 2 (lower index).
    const std::vector<double> load = {60, 0, 10, 10, 10};
    LayerPlan lp = make_layer({{0, 1}, {2}, {3}, {4}}, 5);
    replicate_layer(lp, load, Topology{2, 2, std::nullopt}, {ReplicationMethod::kDynamic, 0});
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0}));
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {0, 2}, {0, 3}, {4}}));
}

TEST(Replication, DynamicRespectsSlots) {
    // S = 2: GPU 1 is full, so expert 0 goes to GPUs 3 and 2, after which no GPU can take expert 1.
    const std::vector<double> load = {50, 30, 10, 10, 15, 5};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4}, {5}}, 6);
    replicate_layer(lp, load, Topology{1, 4, 2}, {ReplicationMethod::kDynamic, 0});
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0, 1}));
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {0, 4}, {0, 5}}));
    build_routing_tables(lp, load, 6, 4);
    EXPECT_NEAR(lp.predicted_gpu_load[0], 50.0 / 3 + 30, 1e-9);
}

TEST(Replication, FixedPutsOneReplicaOnLeastLoaded) {
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    replicate_layer(lp, load, Topology{1, 4, std::nullopt}, {ReplicationMethod::kFixed, 0});
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0, 1}));
    EXPECT_EQ(lp.gpu_experts[3], (std::vector<int>{0, 1, 6, 7}));
    build_routing_tables(lp, load, 8, 4);
    EXPECT_EQ(lp.predicted_gpu_load, (std::vector<double>{40, 20, 15, 45}));
}

TEST(Replication, EplbWaterFillingBudget) {
    // Budget 10 slots for 8 experts: water-filling gives the 2 extra slots to expert 0 (50 -> 25 per replica),
    // then expert 1 (30 > 25).
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    replicate_layer(lp, load, Topology{1, 4, std::nullopt}, {ReplicationMethod::kEplb, 10});
    EXPECT_EQ(lp.num_instances(), 10);
    EXPECT_EQ(lp.hot_experts, (std::vector<int>{0, 1}));
    // Expert 0's replica goes to the least-loaded GPU (3); expert 1's to the then least-loaded (2: 15).
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {1, 4, 5}, {0, 6, 7}}));
}

TEST(Replication, NoneKeepsPrimaries) {
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan lp = make_layer({{0, 1}, {2, 3}, {4, 5}, {6, 7}}, 8);
    replicate_layer(lp, load, Topology{1, 4, std::nullopt}, {ReplicationMethod::kNone, 0});
    EXPECT_EQ(lp.num_instances(), 8);
    EXPECT_TRUE(lp.hot_experts.empty());
    EXPECT_NEAR(lp.gamma, 8.0 / 3.0, 1e-12);
}

TEST(Replication, PaddingAddsUsefulReplicasWithoutDuplicates) {
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 0};
    LayerPlan lp = make_layer({{0, 1, 2}, {3}, {4, 5}, {6, 7}}, 8);
    const int added = pad_to_equal_slots(lp, load, 8, Topology{1, 4, std::nullopt});
    EXPECT_EQ(added, 4);
    // Fewest-first, best load per instance it lacks: GPU 1 +0 (50), GPU 1 +1 (30 > 50/2), GPU 2 +0 (50/2 > 30/2),
    // GPU 3 +0 (50/3 > 30/2).
    EXPECT_EQ(lp.gpu_experts, (std::vector<std::vector<int>>{{0, 1, 2}, {0, 1, 3}, {0, 4, 5}, {0, 6, 7}}));
    EXPECT_THROW(pad_to_equal_slots(lp, load, 8, Topology{1, 4, 2}), Error);
}

TEST(Replication, BadInput) {
    LayerPlan lp = make_layer({{0, 1}, {2, 3}}, 4);
    EXPECT_THROW(replicate_layer(lp, {1, 2, 3}, Topology{1, 2, std::nullopt}, {}), Error);
    EXPECT_THROW(replicate_layer(lp, {1, -2, 3, 4}, Topology{1, 2, std::nullopt}, {}), Error);
    EXPECT_THROW(parse_replication_method("dyn"), Error);
}

// Slot-exact fill (spec §4) on 2 nodes x 1 GPU, 2 slots each, loads [8, 4, 2], primaries {0} | {1, 2}; linear
// compute f(n) = n, 1 byte per token, 1 B/s NICs. GPU 0 has one free slot; candidates:
//   e1 on GPU 0: e1 all local; compute 8 + 2 | 2 + 2 -> 10; copies: e0 4 (node 1 -> 0), e2 1 -> T = 2*4 + 10 = 18
//   e2 on GPU 0: e2 all local; compute 8 + 1 | 4 + 1 -> 9;  copies: e0 4, e1 2         -> T = 2*4 + 9  = 17
// so the fill takes e2, where load-per-instance padding (pad_to_equal_slots) takes e1 (4 > 2).
TEST(Replication, SlotFillTakesThePricedBestReplica) {
    PlacementPricing p;
    p.bytes_per_token = 1;
    p.net_bandwidth = 1;
    p.nvl_bandwidth = 1;
    p.expert_seconds = [](double n) { return n; };
    Topology topo{2, 1};
    topo.slots_per_gpu = 2;
    LayerPlan lp = make_layer({{0}, {1, 2}}, 3);
    EXPECT_EQ(fill_free_slots(lp, {8, 4, 2}, {}, 3, topo, p), 1);
    EXPECT_EQ(lp.gpu_experts[0], (std::vector<int>{0, 2}));
    EXPECT_EQ(lp.gpu_experts[1], (std::vector<int>{1, 2}));
    EXPECT_EQ(lp.num_fill_replicas, 1);
    EXPECT_EQ(lp.primary_gpu, (std::vector<int>{0, 1, 1}));  // primaries stay
    EXPECT_EQ(lp.instance_gpus[2], (std::vector<int>{1, 0}));  // routing tables rebuilt
    LayerPlan padded = make_layer({{0}, {1, 2}}, 3);
    pad_to_equal_slots(padded, {8, 4, 2}, 3, topo);
    EXPECT_EQ(padded.gpu_experts[0], (std::vector<int>{0, 1}));
}

// Every GPU ends with exactly S instances, none twice, whatever the primaries.
TEST(Replication, SlotFillIsExact) {
    Topology topo{2, 2};
    topo.slots_per_gpu = 4;
    LayerPlan lp = make_layer({{0, 1, 2, 3}, {4}, {5, 6}, {7}}, 8);
    const std::vector<double> load = {50, 30, 10, 10, 8, 7, 5, 1};
    EXPECT_EQ(fill_free_slots(lp, load, {}, 8, topo, PlacementPricing{}), 16 - 8);
    for (const auto& ex : lp.gpu_experts) {
        EXPECT_EQ(ex.size(), 4u);
        EXPECT_TRUE(std::adjacent_find(ex.begin(), ex.end()) == ex.end());
    }
    Topology no_slots{2, 2};
    LayerPlan lp2 = make_layer({{0}, {1}, {2}, {3}}, 4);
    EXPECT_THROW(fill_free_slots(lp2, {1, 1, 1, 1}, {}, 4, no_slots, PlacementPricing{}), Error);
    Topology too_many{2, 2};
    too_many.slots_per_gpu = 5;  // 5 slots but only 4 experts
    EXPECT_THROW(fill_free_slots(lp2, {1, 1, 1, 1}, {}, 4, too_many, PlacementPricing{}), Error);
}

}  // namespace
}  // namespace grace
