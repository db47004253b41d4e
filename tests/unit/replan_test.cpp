// Migration-aware re-planning (replan.hpp) on a hand-worked example.
#include "grace/replan.hpp"

#include <gtest/gtest.h>

#include "grace/error.hpp"
#include "grace/replication.hpp"

namespace grace {
namespace {

// 2 nodes x 1 GPU, 2 slots each: GPU 0 holds {0, 1}, GPU 1 holds {1, 2} (primaries 0 -> 0, 1 -> 0, 2 -> 1).
ExpertPlan two_gpu_plan() {
    ExpertPlan p;
    p.num_experts = 3;
    p.num_layers = 1;
    p.top_k = 1;
    p.topology = Topology{2, 1};
    p.topology.slots_per_gpu = 2;
    p.method = "hand";
    LayerPlan lp;
    lp.gpu_experts = {{0, 1}, {1, 2}};
    lp.primary_gpu = {0, 0, 1};
    lp.policy = RoutingPolicy::kTar;
    build_routing_tables(lp, {1, 1, 1}, 3, 2);
    p.layers = {lp};
    return p;
}

RoutingStats new_stats(std::vector<int64_t> load) {
    RoutingStats st;
    st.num_layers = 1;
    st.num_experts = 3;
    st.top_k = 1;
    st.num_tokens = 12;
    st.load = load;
    st.affinity.assign(9, 0);
    return st;
}

ReplanOptions unit_options(int64_t moves) {
    ReplanOptions o;
    o.max_moves = moves;
    o.bytes_per_expert = 100;
    o.pricing.bytes_per_token = 1;
    o.pricing.net_bandwidth = 1;
    o.pricing.nvl_bandwidth = 1;
    o.pricing.expert_seconds = [](double n) { return n; };
    return o;
}

// New loads [2, 2, 8], even sources; linear compute, 1 byte per token, 1 B/s NICs.
// Now: e0's home-1 selection crosses (1), e2's 4 home-0 selections cross; compute 2 + 1 | 1 + 8:
//   T = 2 * 4 + 9 = 17. Only e1 has a second instance, so only its slots can be rewritten:
//   GPU 0: e1 -> e2: e2 local everywhere, e1's home-0 selection crosses (1), e0's home-1 one (1);
//          compute 2 + 4 | 2 + 4 -> T = 2 * 1 + 6 = 8 (gain 9)
//   GPU 1: e1 -> e0: compute 1 + 2 | 1 + 8, e2 still crosses 4 -> T = 17 (gain 0)
// After the first move only e2 has two instances, and rewriting either of its slots costs 9: one move in all.
TEST(Replan, HandWorkedTwoGpus) {
    const ReplanResult r = replan(two_gpu_plan(), new_stats({2, 2, 8}), unit_options(5));
    ASSERT_EQ(r.moves.size(), 1u);
    EXPECT_EQ(r.moves[0].layer, 0);
    EXPECT_EQ(r.moves[0].gpu, 0);
    EXPECT_EQ(r.moves[0].removed, 1);
    EXPECT_EQ(r.moves[0].added, 2);
    EXPECT_DOUBLE_EQ(r.moves[0].gain_seconds, 9.0);
    EXPECT_DOUBLE_EQ(r.time_before[0], 17.0);
    EXPECT_DOUBLE_EQ(r.time_after[0], 8.0);
    EXPECT_DOUBLE_EQ(r.bytes_moved, 100.0);
    const LayerPlan& lp = r.plan.layers[0];
    EXPECT_EQ(lp.gpu_experts[0], (std::vector<int>{0, 2}));
    EXPECT_EQ(lp.gpu_experts[1], (std::vector<int>{1, 2}));
    EXPECT_EQ(lp.primary_gpu, (std::vector<int>{0, 1, 1}));  // e1's primary slot was rewritten: GPU 1 takes over
    EXPECT_EQ(lp.instance_gpus[2], (std::vector<int>{1, 0}));  // routing tables rebuilt
}

// The planner's refinement is the same search on one layer: the same single move, and the plan's diagnostics.
TEST(Replan, RefineLayerMakesTheSameMove) {
    ExpertPlan p = two_gpu_plan();
    const ReplanOptions o = unit_options(-1);
    EXPECT_EQ(refine_layer_priced(p.layers[0], {2, 2, 8}, {}, 3, p.topology, o.pricing, -1), 1);
    EXPECT_EQ(p.layers[0].gpu_experts[0], (std::vector<int>{0, 2}));
    EXPECT_EQ(p.layers[0].primary_gpu, (std::vector<int>{0, 1, 1}));
    EXPECT_EQ(p.layers[0].num_priced_moves, 1);
    ExpertPlan capped = two_gpu_plan();
    EXPECT_EQ(refine_layer_priced(capped.layers[0], {2, 2, 8}, {}, 3, capped.topology, o.pricing, 0), 0);
}

TEST(Replan, BudgetsAreKept) {
    EXPECT_TRUE(replan(two_gpu_plan(), new_stats({2, 2, 8}), unit_options(0)).moves.empty());
    ReplanOptions bytes = unit_options(-1);
    bytes.max_bytes = 99;  // less than one expert's weights
    EXPECT_TRUE(replan(two_gpu_plan(), new_stats({2, 2, 8}), bytes).moves.empty());
    bytes.max_bytes = 100;
    EXPECT_EQ(replan(two_gpu_plan(), new_stats({2, 2, 8}), bytes).moves.size(), 1u);
}

TEST(Replan, BadInput) {
    ReplanOptions none = unit_options(-1);
    EXPECT_THROW(replan(two_gpu_plan(), new_stats({2, 2, 8}), none), Error);  // no budget
    ReplanOptions zero = unit_options(1);
    zero.bytes_per_expert = 0;
    EXPECT_THROW(replan(two_gpu_plan(), new_stats({2, 2, 8}), zero), Error);
    RoutingStats other = new_stats({2, 2, 8});
    other.num_experts = 4;
    other.load = {1, 1, 1, 1};
    other.affinity.assign(16, 0);
    EXPECT_THROW(replan(two_gpu_plan(), other, unit_options(1)), Error);  // E differs
}

}  // namespace
}  // namespace grace
