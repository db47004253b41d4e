#include "grace/engine_routing.hpp"

#include <gtest/gtest.h>

#include "grace/engine_eval.hpp"
#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/routing.hpp"

namespace grace {
namespace {

// Values from CPython 3.11: r = random.Random(42); [r.getrandbits(32) for _ in range(3)], r._randbelow(10).
TEST(PyRandom, MatchesCpythonSeed42) {
    PyRandom r(42);
    EXPECT_EQ(r.getrandbits(32), 2746317213u);
    EXPECT_EQ(r.getrandbits(32), 478163327u);
    EXPECT_EQ(r.getrandbits(32), 107420369u);
    EXPECT_EQ(r.randbelow(10), 4);
    EXPECT_THROW(r.getrandbits(0), Error);
    EXPECT_THROW(r.randbelow(0), Error);
    EXPECT_THROW(r.sample({1, 2}, 3), Error);
}

// r = random.Random(42): _fair_choices([3, 7, 9], 7, r) -> [3, 7, 9, 7, 9, 9, 3]; then ([0], 3) -> [0, 0, 0]
// (one shuffle of equal values: it still draws); then ([1, 2], 3) -> [1, 2, 1].
TEST(SglangFairChoices, MatchesCpythonSeed42) {
    PyRandom r(42);
    EXPECT_EQ(sglang_fair_choices({3, 7, 9}, 7, r), (std::vector<int>{3, 7, 9, 7, 9, 9, 3}));
    EXPECT_EQ(sglang_fair_choices({0}, 3, r), (std::vector<int>{0, 0, 0}));
    EXPECT_EQ(sglang_fair_choices({1, 2}, 3, r), (std::vector<int>{1, 2, 1}));
}

SlotMap slots_of(std::vector<int> experts, int slots_per_gpu) {
    SlotMap m;
    m.slot_expert = experts;
    for (size_t p = 0; p < experts.size(); ++p) m.slot_gpu.push_back(static_cast<int>(p) / slots_per_gpu);
    return m;
}

// 2x2, 2 slots per GPU, E = 5. Expert 0 on GPUs 0 and 3; expert 1 on GPUs 0 and 2 (node 0 has GPUs 0, 1).
TEST(SglangDispatch, LegacyAndNearest) {
    const Topology topo{2, 2, std::nullopt};
    const std::vector<SlotMap> layer{slots_of({0, 1, 2, 3, 1, 4, 4, 0}, 2)};
    const auto legacy = sglang_dispatch_tables(layer, 5, topo, false);
    const auto nearest = sglang_dispatch_tables(layer, 5, topo, true);
    auto at = [](const std::vector<int>& t, int g, int e) { return t[g * 5 + e]; };
    // Same GPU first in both.
    EXPECT_EQ(at(legacy, 0, 0), 0);
    EXPECT_EQ(at(legacy, 3, 0), 7);
    EXPECT_EQ(at(legacy, 2, 1), 4);
    // Nearest: GPU 1 (node 0) takes expert 0's node-0 slot 0 and GPU 2 (node 1) its node-1 slot 7.
    EXPECT_EQ(at(nearest, 1, 0), 0);
    EXPECT_EQ(at(nearest, 2, 0), 7);
    // Nearest: expert 4 on GPUs 2 and 3 (both node 1): GPUs 0 and 1 gain nothing from the node rule, so they
    // take fair choices, one each of slots 5 and 6.
    EXPECT_NE(at(nearest, 0, 4), at(nearest, 1, 4));
    // Every entry is a slot of the right expert.
    for (int g = 0; g < 4; ++g)
        for (int e = 0; e < 5; ++e) {
            EXPECT_EQ(layer[0].slot_expert[at(legacy, g, e)], e);
            EXPECT_EQ(layer[0].slot_expert[at(nearest, g, e)], e);
        }
    // An expert without a slot is an input error.
    EXPECT_THROW(sglang_dispatch_tables({slots_of({0, 1, 2, 0}, 1)}, 4, topo, false), Error);
}

TEST(EngineLayerRouter, TrtllmRoundRobinPerBlock) {
    const Topology topo{1, 4, std::nullopt};
    // Expert 0 on slots 1 and 6 (GPUs 0 and 3), 2 slots per GPU; experts 1..3 once each, twice for 1.
    SlotMap m = slots_of({1, 0, 2, 3, 1, 2, 0, 3}, 2);
    EngineLayerRouter r(m, 4, topo, RoutingPolicy::kTrtllm, 0);
    // Rank 1, k = 2: block 0 starts the counter of expert 0 at b + rank = 1.
    EXPECT_EQ(r.route(1, 0, 0, 0, 2), 6);  // (0 + 1 + 0) mod 2 = 1
    EXPECT_EQ(r.route(1, 0, 1, 0, 2), 1);  // (0 + 1 + 1) mod 2 = 0
    EXPECT_EQ(r.route(1, 0, 2, 1, 2), 6);  // c = 2
    // Local token 512, j = 0 is flat selection 1024: block 1, counters restart.
    EXPECT_EQ(r.route(1, 0, 512, 0, 2), 1);  // (1 + 1 + 0) mod 2 = 0
    // Rank 0 counts on its own.
    EXPECT_EQ(r.route(0, 0, 0, 0, 2), 1);
    EXPECT_FALSE(r.fixed_per_source());
}

TEST(EngineLayerRouter, VllmAscendRankModHolders) {
    const Topology topo{1, 4, std::nullopt};
    // Expert 0 held by GPUs 1 and 3; expert 1 twice on GPU 2 (the last slot counts) and on GPU 0.
    SlotMap m = slots_of({1, 2, 0, 3, 1, 1, 0, 2}, 2);
    EngineLayerRouter r(m, 4, topo, RoutingPolicy::kVllmAscend, 0);
    EXPECT_EQ(r.route(0, 0, 0, 0, 1), 2);  // holders (1, 3): rank 0 -> 0 mod 2 -> GPU 1's slot 2
    EXPECT_EQ(r.route(1, 0, 0, 0, 1), 6);  // rank 1 -> GPU 3, although GPU 1 holds expert 0
    EXPECT_EQ(r.route(3, 0, 5, 0, 1), 6);
    EXPECT_EQ(r.route(1, 1, 0, 0, 1), 5);  // holders (0, 2): rank 1 -> GPU 2's last slot
    EXPECT_TRUE(r.fixed_per_source());
}

TEST(EngineDeployment, PlanOfThePaddedExport) {
    ExpertPlan plan;
    plan.num_experts = 4;
    plan.num_layers = 1;
    plan.top_k = 1;
    plan.topology = Topology{1, 2, std::nullopt};
    LayerPlan lp;
    lp.gpu_experts = {{0, 1, 2}, {3}};
    lp.primary_gpu = {0, 0, 0, 1};
    lp.finalize(4);
    plan.layers = {lp};
    const EngineDeployment d = deploy_to_engine(plan, RoutingPolicy::kSglangStatic);
    EXPECT_EQ(d.map.slots_per_gpu, 3);
    EXPECT_EQ(d.map.num_padded, 2);
    ASSERT_EQ(d.slot_maps.size(), 1u);
    EXPECT_EQ(d.slot_maps[0].slot_gpu, (std::vector<int>{0, 0, 0, 1, 1, 1}));
    EXPECT_EQ(d.plan.layers[0].gpu_experts[1].size(), 3u);  // padded to the engine's slots
    EXPECT_EQ(d.plan.layers[0].policy, RoutingPolicy::kSglangStatic);
    // The engine's slot count: at least the plan's largest, at most E.
    EXPECT_EQ(deploy_to_engine(plan, RoutingPolicy::kVllm, {}, 4).map.slots_per_gpu, 4);
    EXPECT_THROW(deploy_to_engine(plan, RoutingPolicy::kVllm, {}, 2), Error);
    EXPECT_THROW(deploy_to_engine(plan, RoutingPolicy::kVllm, {}, 5), Error);
    EXPECT_THROW(deploy_to_engine(plan, RoutingPolicy::kTar), Error);
    // Routers over the deployment route every selection to a GPU holding the expert.
    auto routers = make_layer_routers(d.plan, RoutingPolicy::kTrtllm, 0, d.slot_maps);
    for (int t = 0; t < 50; ++t)
        for (int e = 0; e < 4; ++e) {
            const int g = routers[0]->route(t % 2, e, t, 0, 1);
            const auto& held = d.plan.layers[0].gpu_experts[g];
            EXPECT_NE(std::find(held.begin(), held.end(), e), held.end());
        }
}

// SGLang's random stream runs over every row of the file, leading (dense) rows included: routers built with a
// leading slot map must pick what the whole-file tables pick for the MoE layer.
TEST(MakeLayerRouters, LeadingMapsAdvanceSglangStream) {
    ExpertPlan plan;
    plan.num_experts = 4;
    plan.num_layers = 1;
    plan.top_k = 1;
    plan.topology = Topology{1, 4, std::nullopt};
    LayerPlan lp;
    lp.gpu_experts = {{0, 1}, {0, 2}, {0, 3}, {1, 2}};
    lp.primary_gpu = {0, 0, 1, 2};
    lp.finalize(4);
    plan.layers = {lp};
    const std::vector<SlotMap> maps{slots_of({0, 1, 2, 3, 0, 1, 2, 3}, 2), slot_map_of(lp)};
    const auto tables = sglang_dispatch_tables(maps, 4, plan.topology, false);
    auto routers = make_layer_routers(plan, RoutingPolicy::kSglangStatic, 0, maps);
    ASSERT_EQ(routers.size(), 1u);
    for (int g = 0; g < 4; ++g)
        for (int e = 0; e < 4; ++e)
            EXPECT_EQ(routers[0]->route(g, e, 0, 0, 1), maps[1].slot_gpu[tables[(4 + g) * 4 + e]]) << g << " " << e;
    // A map that puts an expert on a GPU the plan does not give it is an input error.
    EXPECT_THROW(make_layer_routers(plan, RoutingPolicy::kVllm, 0, {slots_of({0, 1, 2, 3, 0, 1, 2, 3}, 2)}), Error);
}

TEST(Engine, NamesAndPolicies) {
    EXPECT_EQ(parse_engine("vllm-ascend"), Engine::kVllmAscend);
    EXPECT_EQ(to_string(Engine::kTrtllm), "trtllm");
    EXPECT_THROW(parse_engine("tgi"), Error);
    EXPECT_EQ(engine_policy(Engine::kSglang), RoutingPolicy::kSglangStatic);
    EXPECT_NO_THROW(check_engine_policy(Engine::kSglang, RoutingPolicy::kSglangNearest));
    EXPECT_THROW(check_engine_policy(Engine::kVllm, RoutingPolicy::kTar), Error);
    EXPECT_EQ(parse_routing_policy("sglang-nearest"), RoutingPolicy::kSglangNearest);
    EXPECT_EQ(to_string(RoutingPolicy::kVllmAscend), "vllm-ascend");
}

}  // namespace
}  // namespace grace
