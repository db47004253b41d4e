// Online WRR adaptation (adaptation.hpp) and the migration cost of a plan switch (migration.hpp), against
// hand-worked examples.
#include "grace/adaptation.hpp"

#include <gtest/gtest.h>

#include "grace/migration.hpp"
#include "grace/routing.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

// 1x2: GPU 0 holds experts 0 (primary) and 1, GPU 1 holds 2 and a replica of 0. instance_gpus[0] = {0, 1}.
LayerPlan two_gpu_layer(RoutingPolicy policy = RoutingPolicy::kWrr) {
    LayerPlan lp;
    lp.gpu_experts = {{0, 1}, {0, 2}};
    lp.primary_gpu = {0, 0, 1};
    lp.policy = policy;
    lp.finalize(3);
    return lp;
}

TEST(Adaptation, RepredictionByHand) {
    const LayerPlan lp = two_gpu_layer();
    ASSERT_EQ(lp.wrr_weights[0], (std::vector<int>{60, 60}));  // uniform to start with
    // Counts in flat instance order: expert 0 on GPUs 0 and 1, expert 1, expert 2.
    WrrAdapter a(lp, 2, AdaptationOptions{1, 64, 0.0});
    // Loads 40, 20, 60. Equation 4: each instance of expert 0 carries 20, so L'_0 = 20 + 20 = 40 and
    // L'_1 = 20 + 60 = 80; weights 1/40 : 1/80 = 2 : 1 of the period 120.
    const auto& w = a.update({30, 10, 20, 60});
    EXPECT_EQ(w[0], (std::vector<int>{80, 40}));
    EXPECT_EQ(w[1], (std::vector<int>{120}));
    EXPECT_EQ(w[2], (std::vector<int>{120}));
    EXPECT_EQ(repredict_wrr_weights(lp, {40, 20, 60}, 2), w);
    // Decay 0: the next interval alone. Loads 10, 0, 0: L'_0 = L'_1 = 5, so 60 : 60.
    EXPECT_EQ(a.update({5, 5, 0, 0})[0], (std::vector<int>{60, 60}));
    EXPECT_EQ(a.updates(), 2);
}

TEST(Adaptation, DecayedHistoryByHand) {
    WrrAdapter a(two_gpu_layer(), 2, AdaptationOptions{1, 64, 0.5});
    a.update({30, 10, 20, 60});  // history 40, 20, 60
    // History 0.5 * (40, 20, 60) + (10, 0, 0) = (30, 10, 30): L'_0 = 15 + 10 = 25, L'_1 = 15 + 30 = 45, weights
    // 1/25 : 1/45 = 9 : 5 of 120 = 77.14 : 42.86 -> 77 : 43 (largest remainder).
    EXPECT_EQ(a.update({5, 5, 0, 0})[0], (std::vector<int>{77, 43}));
}

TEST(Adaptation, EmptyIntervalKeepsWeightsAndHashTracksTables) {
    WrrAdapter a(two_gpu_layer(), 2, AdaptationOptions{2, 64, 0.0});
    EXPECT_FALSE(a.due(0));
    EXPECT_TRUE(a.due(1));
    const uint64_t h0 = a.tables_hash();
    const auto before = a.weights();
    EXPECT_EQ(a.update({0, 0, 0, 0}), before);
    EXPECT_NE(a.tables_hash(), h0);  // an update is recorded even when the table is unchanged
    WrrAdapter b(two_gpu_layer(), 2, AdaptationOptions{2, 64, 0.0});
    b.update({0, 0, 0, 0});
    EXPECT_EQ(a.tables_hash(), b.tables_hash());
    b.update({30, 10, 20, 60});
    a.update({30, 10, 20, 120});  // weights 93 : 27 instead of 80 : 40
    EXPECT_NE(a.tables_hash(), b.tables_hash());
}

TEST(Adaptation, BadInput) {
    EXPECT_NE(testing::error_of([] {
                  AdaptationOptions{1, 64, 1.0}.validate();
              }).find("--adapt-decay"),
              std::string::npos);
    EXPECT_NE(testing::error_of([] {
                  AdaptationOptions{1, 0, 0.0}.validate();
              }).find("--adapt-batch-tokens"),
              std::string::npos);
    WrrAdapter a(two_gpu_layer(), 2, AdaptationOptions{1, 64, 0.0});
    EXPECT_NE(testing::error_of([&] { a.update({1, 2, 3}); }).find("4 instances"), std::string::npos);
    EXPECT_NE(testing::error_of([&] {
                  repredict_wrr_weights(two_gpu_layer(), {1, -1, 0}, 2);
              }).find("load -1"),
              std::string::npos);
}

TEST(Adaptation, CountsInstancesFromDestinations) {
    const LayerPlan lp = two_gpu_layer();
    std::vector<int64_t> counts(4, 0);
    const int32_t ids[] = {0, 2, 0, 1, -1, 0};
    const int32_t dest[] = {1, 1, 0, 0, -1, 1};
    count_instance_selections(lp, ids, dest, 3, 2, counts);
    EXPECT_EQ(counts, (std::vector<int64_t>{1, 2, 1, 1}));
    const int32_t bad_dest[] = {0, 0};  // expert 2 has no instance on GPU 0
    const int32_t bad_ids[] = {0, 2};
    EXPECT_NE(testing::error_of([&] {
                  count_instance_selections(lp, bad_ids, bad_dest, 1, 2, counts);
              }).find("GPU 0, which holds no instance"),
              std::string::npos);
}

TEST(Adaptation, RouterKeepsCountersAcrossWeightChange) {
    const LayerPlan lp = two_gpu_layer();
    const Topology topo = Topology::parse("1x2");
    ReplicaRouter r(lp, topo, RoutingPolicy::kWrr);
    for (int i = 0; i < 7; ++i) r.route(0, 0, i, 0, 1);
    ASSERT_EQ(r.wrr_offset(0, 0), 7);
    const std::vector<std::vector<int>> w{{80, 40}, {120}, {120}};
    r.set_wrr_weights(w);
    EXPECT_EQ(r.wrr_offset(0, 0), 7);
    const auto seq = smooth_wrr_sequence({80, 40});
    for (int i = 0; i < 5; ++i) EXPECT_EQ(r.route(0, 0, 0, 0, 1), lp.instance_gpus[0][seq[7 + i]]);
    ReplicaRouter p(lp, topo, RoutingPolicy::kPrimary);
    EXPECT_NE(testing::error_of([&] { p.set_wrr_weights(w); }).find("wrr and tar"), std::string::npos);
}

// The replay's adaptation against a direct simulation with ReplicaRouter and WrrAdapter: per batch, each GPU's
// next B tokens, an update every N batches.
TEST(Adaptation, ReplayMatchesDirectSimulation) {
    ExpertPlan plan;
    plan.num_experts = 3, plan.num_layers = 1, plan.top_k = 1;
    plan.topology = Topology::parse("1x2");
    plan.layers = {two_gpu_layer()};
    RoutingTrace trace;
    trace.num_tokens = 23, trace.num_layers = 1, trace.top_k = 1, trace.num_experts = 3;
    for (int t = 0; t < 23; ++t) trace.expert_ids.push_back(t % 5 == 4 ? 1 : t % 3 == 2 ? 2 : 0);
    const AdaptationOptions opt{2, 3, 0.0};
    const AdaptiveReplay ar = replay_adaptive(trace, plan, {}, opt);
    EXPECT_EQ(ar.batches, 4);  // blocks of 12 and 11 tokens, 3 per batch
    EXPECT_EQ(ar.updates, 2);

    LayerPlan lp = plan.layers[0];
    ReplicaRouter router(lp, plan.topology, RoutingPolicy::kWrr);
    WrrAdapter adapter(lp, 2, opt);
    std::vector<int64_t> interval(4, 0), total(4, 0);
    const int64_t begin[3] = {0, 12, 23};
    for (int b = 0; b < 4; ++b) {
        for (int g = 0; g < 2; ++g)
            for (int64_t t = begin[g] + 3 * b; t < std::min(begin[g + 1], begin[g] + 3 * b + 3); ++t) {
                const int e = trace.expert_ids[t];
                router.route(g, e, t, 0, 1);
                const int inst = (e == 0 ? 0 : e + 1) + router.last_instance();
                ++interval[inst], ++total[inst];
            }
        if (adapter.due(b)) {
            router.set_wrr_weights(adapter.update(interval));
            std::fill(interval.begin(), interval.end(), 0);
        }
    }
    EXPECT_EQ(ar.final_weights[0], adapter.weights());
    EXPECT_EQ(ar.layer_hashes[0], adapter.tables_hash());
    EXPECT_EQ(ar.counts[0].instance_load,
              (std::vector<std::vector<int64_t>>{{total[0], total[1]}, {total[2]}, {total[3]}}));
    EXPECT_EQ(ar.counts[0].num_tokens, 23);

    // No update: the same counts as the plain replay (per-GPU batch order replays like trace order).
    const AdaptiveReplay none = replay_adaptive(trace, plan, {}, AdaptationOptions{100, 3, 0.0});
    const auto plain = replay_trace(trace, plan);
    EXPECT_EQ(none.counts[0].instance_load, plain[0].instance_load);
    EXPECT_EQ(none.counts[0].hsc.copies, plain[0].hsc.copies);

    plan.layers[0].policy = RoutingPolicy::kPrimary;
    EXPECT_NE(testing::error_of([&] { replay_adaptive(trace, plan, {}, opt); }).find("wrr or tar"), std::string::npos);
}

// --adapt-batch-tokens near INT64_MAX is one batch per GPU holding all its tokens (the batch count once
// overflowed to 0 and nothing was replayed).
TEST(Adaptation, HugeBatchIsOneBatch) {
    ExpertPlan plan;
    plan.num_experts = 3, plan.num_layers = 1, plan.top_k = 1;
    plan.topology = Topology::parse("1x2");
    plan.layers = {two_gpu_layer()};
    RoutingTrace trace;
    trace.num_tokens = 23, trace.num_layers = 1, trace.top_k = 1, trace.num_experts = 3;
    for (int t = 0; t < 23; ++t) trace.expert_ids.push_back(t % 3);
    const AdaptiveReplay ar =
        replay_adaptive(trace, plan, {}, AdaptationOptions{1, std::numeric_limits<int64_t>::max(), 0.0});
    EXPECT_EQ(ar.batches, 1);
    EXPECT_EQ(ar.counts[0].num_tokens, 23);
    EXPECT_EQ(ar.counts[0].instance_load, replay_trace(trace, plan)[0].instance_load);
}

TEST(Migration, ByHand) {
    // 2x2, one layer. PLAN2 adds expert 1 on GPU 0 (from GPU 1, same node: NVLink), expert 0 on GPU 2 (no holder
    // on node 1: from GPU 0 over the NICs) and expert 2 on GPU 3 (from GPU 2, NVLink).
    ExpertPlan a;
    a.num_experts = 4, a.num_layers = 1, a.top_k = 1;
    a.topology = Topology::parse("2x2");
    LayerPlan l1;
    l1.gpu_experts = {{0}, {1}, {2}, {3}};
    l1.primary_gpu = {0, 1, 2, 3};
    l1.finalize(4);
    a.layers = {l1};
    ExpertPlan b = a;
    b.layers[0].gpu_experts = {{0, 1}, {1}, {0, 2}, {2, 3}};
    b.layers[0].instance_gpus.clear(), b.layers[0].wrr_weights.clear();
    b.layers[0].finalize(4);
    HardwareModel hw;
    hw.intra_node_bandwidth = 10;
    hw.cross_node_bandwidth = 5;
    const MigrationCost c = migration_cost(a, b, 100, hw);
    EXPECT_EQ(c.experts_received, (std::vector<int64_t>{1, 0, 1, 1}));
    EXPECT_EQ(c.intra_node_bytes_in, (std::vector<double>{100, 0, 0, 100}));
    EXPECT_EQ(c.cross_node_bytes_in, (std::vector<double>{0, 0, 100, 0}));
    EXPECT_EQ(c.total_bytes, 300);
    EXPECT_DOUBLE_EQ(c.intra_node_time_s, 10);  // 100 B over 10 B/s on GPUs 0, 1, 2, 3 (in or out)
    EXPECT_DOUBLE_EQ(c.cross_node_time_s, 20);  // 100 B into node 1 over 5 B/s
    EXPECT_DOUBLE_EQ(c.time_s, 20);
    // Switching back moves nothing: every instance of PLAN1 is in PLAN2.
    EXPECT_EQ(migration_cost(b, a, 100, hw).total_experts, 0);

    ExpertPlan other = b;
    other.topology = Topology::parse("1x4");
    EXPECT_NE(testing::error_of([&] { check_switchable(a, other); }).find("topology 1x4"), std::string::npos);
    other = b;
    other.num_experts = 5;
    EXPECT_NE(testing::error_of([&] { check_switchable(a, other); }).find("5 experts"), std::string::npos);
}

}  // namespace
}  // namespace grace
