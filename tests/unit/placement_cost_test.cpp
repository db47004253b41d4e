// The planner's placement price (placement_cost.hpp) on a hand-worked example.
#include "grace/placement_cost.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "grace/error.hpp"

namespace grace {
namespace {

// Linear compute f(n) = n seconds, 1 byte per token, 1 B/s per NIC: times are token counts.
PlacementPricing unit_pricing() {
    PlacementPricing p;
    p.bytes_per_token = 1;
    p.net_bandwidth = 1;
    p.nvl_bandwidth = 1;
    p.expert_seconds = [](double n) { return n; };
    return p;
}

// 2 nodes x 1 GPU, loads [8, 4], even sources (GPU 0 and 1 each send 4 selections of e0, 2 of e1),
// e0 on GPU 0, e1 on GPU 1.
//   e0: home 0 local (4); home 1 has no instance on its node -> 4 copies node 1 -> node 0.
//   e1: home 1 local (2); home 0 -> 2 copies node 0 -> node 1.
//   compute: GPU 0 = f(8) = 8, GPU 1 = f(4) = 4; busiest NIC direction: 4 copies.
//   T = 2 * 4 + 8 = 16.
// + e0 on GPU 1: every selection local; compute 4 | 4 + 4; e1's 2 copies remain: T = 2 * 2 + 8 = 12.
// + e1 on GPU 0: compute 8 + 2 | 2; e0's 4 copies remain: T = 2 * 4 + 10 = 18.
TEST(PlacementCost, HandWorkedTwoNodes) {
    const Topology topo{2, 1};
    LayerCostModel cost({8, 4}, {}, {{0}, {1}}, topo, unit_pricing());
    EXPECT_DOUBLE_EQ(cost.time(), 16.0);
    EXPECT_DOUBLE_EQ(cost.time_with(0, 1), 12.0);
    EXPECT_DOUBLE_EQ(cost.time_with(1, 0), 18.0);
    std::vector<double> t, m;
    cost.times_with(0, {1, 1}, t, m);
    EXPECT_TRUE(std::isinf(t[0]));  // GPU 0 holds e0 already
    EXPECT_DOUBLE_EQ(t[1], 12.0);
    // Tie-breaker, means instead of maxima: per node max(out, in) = 2 (node 0 sends e1's 2 copies) and 2 (node 1
    // receives them), mean 2; compute (4 + 8) / 2 = 6: 2 * 2 + 6.
    EXPECT_DOUBLE_EQ(m[1], 2.0 * 2.0 + 6.0);
    cost.add(0, 1);
    EXPECT_DOUBLE_EQ(cost.time(), 12.0);
    EXPECT_EQ(cost.instances()[0], (std::vector<int>{0, 1}));
}

// Source loads given: all of e0's selections come from GPU 1 (node 1), so its copies cross; 1 node x 2 GPUs
// turns them into intra-node copies priced on NVLink instead.
TEST(PlacementCost, SourceLoadsAndIntraNode) {
    PlacementPricing p = unit_pricing();
    p.nvl_bandwidth = 4;  // intra-node copies cost a quarter
    const Topology one_node{1, 2};
    // e0 (load 8) all from GPU 1, on GPU 0: 8 intra copies 1 -> 0; e1 (load 4) from GPU 0, on GPU 1: 4 copies.
    LayerCostModel cost({8, 4}, {0, 4, 8, 0}, {{0}, {1}}, one_node, p);
    EXPECT_DOUBLE_EQ(cost.time(), 2.0 * 8.0 / 4.0 + 8.0);
    const Topology two_nodes{2, 1};
    LayerCostModel cross({8, 4}, {0, 4, 8, 0}, {{0}, {1}}, two_nodes, p);
    EXPECT_DOUBLE_EQ(cross.time(), 2.0 * 8.0 + 8.0);
}

// The incremental answers (times_with, swap_times: cached deltas priced against a ranked base) against a model
// built from scratch with the change made, on random placements of 2 x 4 and 1 x 8 GPUs with source loads.
TEST(PlacementCost, IncrementalAnswersMatchAModelBuiltWithTheChange) {
    std::mt19937 rng(7);
    for (const Topology topo : {Topology{2, 4}, Topology{1, 8}}) {
        const int E = 12, G = topo.num_gpus();
        std::vector<double> load(E), sources(static_cast<size_t>(G) * E);
        for (int e = 0; e < E; ++e)
            for (int g = 0; g < G; ++g) {
                sources[static_cast<size_t>(g) * E + e] = static_cast<double>(rng() % 50);
                load[e] += sources[static_cast<size_t>(g) * E + e];
            }
        std::vector<std::vector<int>> inst(E);
        for (int e = 0; e < E; ++e) {
            inst[e].push_back(e % G);
            if (e % 3 == 0) inst[e].push_back((e + 3) % G);  // every third expert replicated
        }
        PlacementPricing p = unit_pricing();
        p.nvl_bandwidth = 3;
        const LayerCostModel cost(load, sources, inst, topo, p);
        auto fresh_time = [&](const std::vector<std::vector<int>>& changed) {
            return LayerCostModel(load, sources, changed, topo, p).time();
        };
        std::vector<double> t, m;
        for (int e = 0; e < E; ++e) {
            cost.times_with(e, std::vector<char>(G, 1), t, m);
            for (int g = 0; g < G; ++g) {
                if (std::find(inst[e].begin(), inst[e].end(), g) != inst[e].end()) {
                    EXPECT_TRUE(std::isinf(t[g]));
                    continue;
                }
                auto changed = inst;
                changed[e].push_back(g);
                EXPECT_NEAR(t[g], fresh_time(changed), 1e-9 * fresh_time(changed)) << "e" << e << " g" << g;
            }
        }
        std::vector<double> without;
        cost.times_without(without);
        ASSERT_EQ(static_cast<int>(without.size()), E);
        for (int e = 0; e < E; ++e) EXPECT_EQ(without[e], cost.time_without(e)) << "e" << e;
        for (int x = 0; x < E; ++x) {
            if (inst[x].size() < 2) continue;
            const int gpu = inst[x][1];
            cost.swap_times(gpu, x, std::vector<char>(E, 1), t);
            for (int y = 0; y < E; ++y) {
                const bool held = std::find(inst[y].begin(), inst[y].end(), gpu) != inst[y].end();
                if (y == x || held) {
                    EXPECT_TRUE(std::isinf(t[y]));
                    continue;
                }
                auto changed = inst;
                changed[x].erase(changed[x].begin() + 1);
                changed[y].push_back(gpu);
                EXPECT_NEAR(t[y], fresh_time(changed), 1e-9 * fresh_time(changed)) << "x" << x << " y" << y;
            }
        }
    }
}

TEST(PlacementCost, BadInput) {
    const Topology topo{2, 1};
    EXPECT_THROW(LayerCostModel({8, 4}, {}, {{0}}, topo, unit_pricing()), Error);         // one list for 2 experts
    EXPECT_THROW(LayerCostModel({8, 4}, {1, 2, 3}, {{0}, {1}}, topo, unit_pricing()), Error);  // not G*E
    EXPECT_THROW(LayerCostModel({8, 4}, {}, {{0}, {}}, topo, unit_pricing()), Error);      // no instance
    EXPECT_THROW(LayerCostModel({8, 4}, {}, {{0}, {2}}, topo, unit_pricing()), Error);     // GPU out of range
    PlacementPricing bad = unit_pricing();
    bad.net_bandwidth = 0;
    EXPECT_THROW(LayerCostModel({8, 4}, {}, {{0}, {1}}, topo, bad), Error);
}

}  // namespace
}  // namespace grace
