#include "grace/plan.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "grace/error.hpp"
#include "grace/planner.hpp"
#include "test_util.hpp"
#include "unit/planner_test_util.hpp"

namespace grace {
namespace {

// 2 nodes x 2 GPUs, 4 experts: primaries 0->0, 1->1, 2->3, 3->2; replicas: expert 0 on 2 and 3, expert 2 on 2.
ExpertPlan toy_plan() {
    ExpertPlan p;
    p.num_experts = 4;
    p.num_layers = 1;
    p.top_k = 2;
    p.topology = Topology{2, 2, std::nullopt};
    p.method = "test";
    LayerPlan lp;
    lp.gpu_experts = {{0}, {1}, {0, 2, 3}, {0, 2}};
    lp.primary_gpu = {0, 1, 3, 2};
    lp.policy = RoutingPolicy::kTar;
    lp.finalize(4);
    p.layers.push_back(lp);
    return p;
}

using testing::error_of;

TEST(Plan, FinalizeOrdersInstancesPrimaryFirst) {
    ExpertPlan p = toy_plan();
    const LayerPlan& lp = p.layers[0];
    EXPECT_EQ(lp.instance_gpus[0], (std::vector<int>{0, 2, 3}));
    EXPECT_EQ(lp.instance_gpus[2], (std::vector<int>{3, 2}));
    EXPECT_EQ(lp.wrr_weights[0], (std::vector<int>{40, 40, 40}));
    EXPECT_EQ(lp.wrr_weights[1], (std::vector<int>{120}));
    EXPECT_EQ(lp.num_instances(), 7);
    EXPECT_NO_THROW(p.validate());
}

TEST(Plan, JsonRoundTripIsByteIdentical) {
    ExpertPlan p = toy_plan();
    p.layers[0].r_star = 0.25;
    p.layers[0].knee_curves = {{{0, 0.5, 0}, {0.5, 0.7, 1}}};
    p.layers[0].hot_experts = {0};
    p.layers[0].predicted_gpu_load = {1.5, 2, 3, 4};
    std::string a = plan_to_json(p);
    ExpertPlan q = plan_from_json(a);
    EXPECT_EQ(plan_to_json(q), a);
    EXPECT_EQ(plan_hash(q), plan_hash(p));
    EXPECT_EQ(q.layers[0].knee_curves[0][1].u, 0.7);
    EXPECT_NE(a.find("\"format\": \"grace.plan/v1\""), std::string::npos);
}

TEST(Plan, ValidateNamesEachViolation) {
    {
        ExpertPlan p = toy_plan();
        p.layers[0].gpu_experts[1] = {};
        EXPECT_NE(error_of([&] { p.validate(); }).find("expert 1 has no instance"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.layers[0].primary_gpu[3] = 0;
        EXPECT_NE(error_of([&] { p.validate(); }).find("expert 3's primary GPU 0 does not hold it"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.layers[0].gpu_experts[2] = {0, 0, 2, 3};
        EXPECT_NE(error_of([&] { p.validate(); }).find("holds two instances of expert 0"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.topology.slots_per_gpu = 2;
        EXPECT_NE(error_of([&] { p.validate(); }).find("holds 3 instances but has only 2 slots"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.layers[0].wrr_weights[0] = {40, 40, 39};
        EXPECT_NE(error_of([&] { p.validate(); }).find("sum to 119"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.layers[0].gpu_experts[2] = {0, 2, 7};
        EXPECT_NE(error_of([&] { p.validate(); }).find("holds expert 7"), std::string::npos);
    }
    {
        ExpertPlan p = toy_plan();
        p.layers[0].gpu_experts = {{0}, {1}, {2}};
        EXPECT_NE(error_of([&] { p.validate(); }).find("topology 2x2 has 4"), std::string::npos);
    }
}

TEST(Plan, ParsingRejectsMalformedJson) {
    EXPECT_NE(error_of([] { plan_from_json("{"); }).find("not valid JSON"), std::string::npos);
    EXPECT_NE(error_of([] { plan_from_json(R"({"format": "other"})"); }).find("expected 'grace.plan/v1'"),
              std::string::npos);
    EXPECT_NE(error_of([] { plan_from_json(R"({"format": "grace.plan/v1", "num_experts": 4})"); }).find("num_layers"),
              std::string::npos);
    // A minimal plan from another tool (no routing tables) is completed, then validated.
    std::string minimal = R"({"format": "grace.plan/v1", "num_experts": 2, "num_layers": 1, "top_k": 1,
        "topology": {"nodes": 1, "gpus_per_node": 2, "slots_per_gpu": null}, "method": "x",
        "layers": [{"layer": 0, "gpu_experts": [[0], [1]], "primary_gpu": [0, 1]}]})";
    ExpertPlan p = plan_from_json(minimal);
    EXPECT_EQ(p.layers[0].instance_gpus[1], (std::vector<int>{1}));
}

TEST(Plan, SaveLoadAndMissingFolder) {
    testing::TempDir dir;
    ExpertPlan p = toy_plan();
    save_plan(p, dir.file("p.json"));
    EXPECT_EQ(plan_to_json(load_plan(dir.file("p.json"))), plan_to_json(p));
    EXPECT_NE(error_of([&] { save_plan(p, dir.file("no/p.json")); }).find("does not exist"), std::string::npos);
}

// Plan JSON of toy_plan() with one value replaced by `edit`, parsed back: the error message, or "" if none.
std::string plan_error_with(const std::function<void(nlohmann::ordered_json&)>& edit) {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(plan_to_json(toy_plan()));
    edit(j);
    return error_of([&] { plan_from_json(j.dump()); });
}

TEST(PlanLimits, IntegersAreRangeCheckedNotNarrowed) {
    // 2^32 + 16 used to be read as 16 (get<int> narrows); 16.7 as 16.
    EXPECT_EQ(plan_error_with([](auto& j) { j["num_experts"] = (uint64_t{1} << 32) + 16; }),
              "plan: num_experts: 4294967312 is outside [1, 2147483647]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["num_experts"] = 16.7; }), "plan: num_experts: 16.7 is not an integer");
    EXPECT_EQ(plan_error_with([](auto& j) { j["top_k"] = "2"; }), "plan: top_k: \"2\" is not an integer");
    EXPECT_EQ(plan_error_with([](auto& j) { j["top_k"] = 5; }), "plan: top_k: 5 is outside [1, 4]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["layers"][0]["routing"]["weights"][0][1] = (uint64_t{1} << 32) + 16; }),
              "plan: layers[0].routing.weights[0][1]: 4294967312 is outside [1, 65535]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["layers"][0]["gpu_experts"][2][1] = -1; }),
              "plan: layers[0].gpu_experts[2][1]: -1 is outside [0, 3]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["layers"][0]["primary_gpu"][3] = 4; }),
              "plan: layers[0].primary_gpu[3]: 4 is outside [0, 3]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["layers"][0]["routing"]["period"] = 1e6; }),
              "plan: layers[0].routing.period: 1000000.0 is outside [1, 65535]");
    EXPECT_EQ(plan_error_with([](auto& j) { j["topology"].erase("nodes"); }), "plan: missing field topology.nodes");
    EXPECT_EQ(plan_error_with([](auto& j) { j["seed"] = -1; }), "plan: seed: -1 is outside [0, 18446744073709551615]");
    // A whole number written as a float is the integer it spells.
    EXPECT_EQ(plan_error_with([](auto& j) { j["num_layers"] = 1.0; }), "");
}

TEST(PlanLimits, WrrWeightsThatOverflowAnIntSumAreRejected) {
    // [2^31-1, 2^31-1, 122] sums to 120 in 32-bit arithmetic, the period: validate() must see 2^32 + 120.
    ExpertPlan p = toy_plan();
    p.layers[0].wrr_weights[0] = {2147483647, 2147483647, 122};
    EXPECT_EQ(error_of([&] { p.validate(); }),
              "plan layer 0: WRR weights of expert 0 sum to 4294967416, not the period 120");
    // Read from JSON, the first weight already fails its range.
    EXPECT_EQ(plan_error_with([](auto& j) {
                  j["layers"][0]["routing"]["weights"][0] = {2147483647, 2147483647, 122};
              }),
              "plan: layers[0].routing.weights[0][0]: 2147483647 is outside [1, 65535]");
}

TEST(PlanLimits, HugeCountsFailBeforeSizingTables) {
    // num_experts 2^31-1 is in range, but the layer lists 4 experts: fail on the sizes, not in an allocation.
    EXPECT_EQ(plan_error_with([](auto& j) { j["num_experts"] = 2147483647; }),
              "plan layer 0: primary_gpu has 4 entries, expected 2147483647");
    EXPECT_EQ(plan_error_with([](auto& j) {
                  j["topology"] = {{"nodes", 65536}, {"gpus_per_node", 65536}};
              }),
              "plan: topology 65536x65536 has 4294967296 GPUs, more than the 65536 grace supports");
    EXPECT_EQ(plan_error_with([](auto& j) { j["topology"]["gpus_per_node"] = 65537; }),
              "plan: topology.gpus_per_node: 65537 is outside [1, 65536]");
}

TEST(PlanLimits, SlotsPerGpuIsBoundedByWhatItMeans) {
    const RoutingStats st = testing::make_random_stats(1, 16, 2, 200, 3);
    PlanOptions eplb;
    eplb.method = "eplb";
    // 8 x (2^31-1) slots used to wrap to -8 inside the EPLB path.
    EXPECT_EQ(
        error_of([&] {
            make_plan(st, Topology{1, 8, 2147483647}, eplb);
        }),
        "slots per GPU (--slots-per-gpu) 2147483647 exceeds the 16 experts: a GPU holds each expert at most once");
    EXPECT_EQ(error_of([&] {
                  make_plan(st, Topology{1, 8, 1}, eplb);
              }),
              "topology 1x8:1 has 8 x 1 = 8 slots, too few for the 16 experts (--slots-per-gpu must be at least 2)");
    EXPECT_EQ(make_plan(st, Topology{1, 8, 16}, eplb).topology.slots_per_gpu, 16);
    eplb.method = "eplb-hierarchical+eplb:2147483640";  // divisible by 8 GPUs: used to size EPLB's tables by it
    EXPECT_EQ(error_of([&] { make_plan(st, Topology{1, 8, std::nullopt}, eplb); }),
              "eplb:2147483640 means 268435455 slots per GPU, more than the 16 experts");
}

TEST(RoutingPolicyNames, RoundTripAndUnknown) {
    for (auto pol : {RoutingPolicy::kPrimary, RoutingPolicy::kWrr, RoutingPolicy::kTar, RoutingPolicy::kVllm,
                     RoutingPolicy::kSglangStatic, RoutingPolicy::kSglangDynamic})
        EXPECT_EQ(parse_routing_policy(to_string(pol)), pol);
    EXPECT_NE(error_of([] { parse_routing_policy("fastest"); }).find("unknown routing policy 'fastest'"),
              std::string::npos);
}

}  // namespace
}  // namespace grace
