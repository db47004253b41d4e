// priced_search: the cost model's choice among candidate placements (issue #13), against hand-worked prices.
#include "grace/priced_search.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "grace/error.hpp"
#include "grace/planner.hpp"
#include "grace/replication.hpp"
#include "unit/planner_test_util.hpp"

namespace grace {
namespace {

// Unit links and f(n) = n + c for n > 0: prices are plain token counts, easy to work by hand.
PlacementPricing unit_pricing(double c) {
    PlacementPricing p;
    p.bytes_per_token = 1;
    p.net_bandwidth = 1;
    p.nvl_bandwidth = 1;
    p.expert_seconds = [c](double n) { return n > 0 ? n + c : 0.0; };
    return p;
}

LayerPlan primaries(const std::vector<int>& gpu_of, int G) {
    LayerPlan lp;
    lp.gpu_experts.assign(G, {});
    lp.primary_gpu = gpu_of;
    for (int e = 0; e < static_cast<int>(gpu_of.size()); ++e) lp.gpu_experts[gpu_of[e]].push_back(e);
    return lp;
}

TEST(PricedSearch, CheapestKeepsTheEarlierOnTies) {
    EXPECT_EQ(cheapest({3.0, 2.0, 2.0}), 1u);
    EXPECT_EQ(cheapest({2.0, 2.0 * (1 - 1e-12), 5.0}), 0u);  // rounding noise is a tie
    EXPECT_EQ(cheapest({2.0, 1.9}), 1u);
    EXPECT_EQ(cheapest({7.0}), 0u);
    EXPECT_THROW(cheapest({}), Error);
}

// Two nodes of one GPU, experts 0 on GPU 0 and 1 on GPU 1, 100 tokens each, 50 from each home GPU: each node sends
// and receives 50 copies (t_cross = 50, dispatch + combine = 100) and each GPU computes f(100) = 100 + c.
TEST(PricedSearch, PriceLayerHandWorked) {
    const Topology topo{2, 1, std::nullopt};
    const LayerPlan lp = primaries({0, 1}, 2);
    EXPECT_DOUBLE_EQ(price_layer(lp, {100, 100}, {}, topo, unit_pricing(0)), 200.0);
    EXPECT_DOUBLE_EQ(price_layer(lp, {100, 100}, {}, topo, unit_pricing(7)), 207.0);
    // Profiled sources: GPU 0 sends nothing of expert 1, GPU 1 sends 20 of expert 0: node 1 is the busier NIC.
    EXPECT_DOUBLE_EQ(price_layer(lp, {100, 100}, {80, 0, 20, 100}, topo, unit_pricing(0)), 2 * 20 + 100.0);
}

// Two nodes of one GPU; experts 0 and 1 on GPU 1, expert 2 on GPU 0; 100 tokens each, half homed on each GPU; 40
// tokens select both 0 and 1. Node 0 sends S = 50 + 50 selections to node 1 with P = 40 * 0.5 co-activated pairs
// among them: 100^2 / (100 + 2 * 20) = 71.43 tokens (the truth is 50 + 50 - 20 = 80: the estimate is a lower
// bound); node 1 sends 50 selections of expert 2, no pairs: 50 tokens. Flat counting would say 100.
TEST(PricedSearch, HscCrossCopiesHandWorked) {
    const Topology topo{2, 1, std::nullopt};
    const std::vector<std::vector<int>> inst = {{1}, {1}, {0}};
    std::vector<double> a(9, 0.0);
    a[0 * 3 + 1] = a[1 * 3 + 0] = 40;
    const std::vector<double> load = {100, 100, 100};
    EXPECT_DOUBLE_EQ(hsc_cross_copies(inst, load, {}, a, topo), 10000.0 / 140.0);
    EXPECT_DOUBLE_EQ(hsc_cross_copies(inst, load, {}, std::vector<double>(9, 0.0), topo), 100.0);  // no pairs: flat
    // hsc_price swaps that into the model's price: compute max(f(100) + f(100), f(100)) = 200, no NVLink traffic.
    const LayerCostModel model(load, {}, inst, topo, unit_pricing(0));
    EXPECT_DOUBLE_EQ(model.time(), 2 * 100 + 200.0);
    EXPECT_DOUBLE_EQ(hsc_price(model, load, {}, a, topo), 2 * 10000.0 / 140.0 + 200.0);
    EXPECT_DOUBLE_EQ(hsc_price(model, load, {}, {}, topo), model.time());  // no affinity: the flat price
    EXPECT_THROW(hsc_cross_copies(inst, load, {}, {1.0}, topo), Error);
}

// One node of two GPUs, loads [300, 100], expert 0 on GPU 0, expert 1 on GPU 1, even sources.
//   no replica:   GPU 1 sends 150 copies of expert 0 (GPU 0 sends 50 of expert 1): 2 * 150 + f(300) = 600 + c.
//   DR round 1:   gamma = 1.5, R = 1, expert 0 replicated on GPU 1; TAR serves it at home: only GPU 0's 50
//                 selections of expert 1 move, compute max(f(150), f(150) + f(100)): 2 * 50 + 250 + 2c = 350 + 2c.
//   round 2 adds nothing (GPU 1's heaviest share, expert 0, is on both GPUs already).
// So the replica pays for c < 250 and not beyond.
TEST(PricedSearch, ReplicationRoundsChosenByPrice) {
    const Topology topo{1, 2, std::nullopt};
    for (const auto& [c, rounds, price] : {std::tuple{0.0, 1, 350.0}, std::tuple{1000.0, 0, 1600.0}}) {
        LayerPlan lp = primaries({0, 1}, 2);
        double p = 0;
        EXPECT_EQ(replicate_priced(lp, {300, 100}, {}, topo, unit_pricing(c), &p), rounds) << c;
        EXPECT_DOUBLE_EQ(p, price) << c;
        EXPECT_EQ(lp.num_instances(), 2 + rounds) << c;
        EXPECT_DOUBLE_EQ(lp.gamma, 1.5);
        EXPECT_DOUBLE_EQ(price_layer(lp, {300, 100}, {}, topo, unit_pricing(c)), price) << c;
    }
}

// Level-1 candidates: the spectral split first, then each ratio's controlled split, duplicates dropped, sizes in
// bounds.
TEST(PricedSearch, NodeSplitCandidates) {
    // Experts 0-5 co-activate strongly, 6-7 with each other only: the spectral split is 6 / 2.
    const int E = 8;
    std::vector<double> a(E * E, 0.0);
    for (int i = 0; i < E; ++i)
        for (int j = 0; j < E; ++j)
            if (i != j && (i < 6) == (j < 6)) a[i * E + j] = 10;
    a[0 * E + 6] = a[6 * E + 0] = 1;  // keeps the graph connected
    Grouping spectral = spectral_grouping(a, E, 2);
    const auto sizes = spectral.sizes();
    EXPECT_EQ(std::min(sizes[0], sizes[1]), 2);
    const std::vector<Grouping> c = node_split_candidates(a, E, spectral, 1, 0);
    ASSERT_GE(c.size(), 2u);
    EXPECT_EQ(c[0].group_of, spectral.group_of);
    EXPECT_EQ(c[1].sizes(), (std::vector<int>{4, 4}));  // ratio 0: balanced
    for (size_t i = 0; i < c.size(); ++i)
        for (size_t j = 0; j < i; ++j) EXPECT_NE(c[i].group_of, c[j].group_of);
    // ratio 0.125 gives [3.5 -> 3, 5] on 2 groups of 4: 6 / 2 moves to 5 / 3
    bool five_three = false;
    for (const Grouping& g : c) {
        const auto s = g.sizes();
        five_three |= std::max(s[0], s[1]) == 5;
    }
    EXPECT_TRUE(five_three);
}

RoutingStats clique_stats() {
    // One layer, 8 experts of equal load 100; experts 0-5 co-activate strongly, 6-7 weakly with everything.
    RoutingStats st;
    st.num_layers = 1;
    st.num_experts = 8;
    st.top_k = 2;
    st.num_tokens = 400;
    st.model = "test";
    st.dataset = "clique";
    st.load.assign(8, 100);
    st.affinity.assign(64, 0);
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j)
            if (i != j) st.affinity[i * 8 + j] = (i < 6 && j < 6) ? 20 : 1;
    return st;
}

// The paper's HG splits the clique 6 / 2 over two single-GPU nodes (its compute is 6 f(100) on one GPU); the
// priced grouping keeps the candidate that hsc_price finds cheapest, here a balanced split, and never one dearer
// than any candidate that hierarchical:R or occult gives on its own.
TEST(PricedSearch, PricedGroupingTakesTheCheapestCandidate) {
    const RoutingStats st = clique_stats();
    const Topology topo{2, 1, std::nullopt};
    const std::vector<double> load(8, 100.0);
    PlanOptions opt;
    opt.pricing = unit_pricing(0);
    auto price_of = [&](const std::string& method) {
        opt.method = method;
        const LayerPlan lp = make_plan(st, topo, opt).layers[0];
        std::vector<std::vector<int>> inst(8);
        for (int g = 0; g < 2; ++g)
            for (int e : lp.gpu_experts[g]) inst[e].push_back(g);
        std::vector<double> a(st.affinity.begin(), st.affinity.end());
        return hsc_price(LayerCostModel(load, {}, inst, topo, opt.pricing), load, {}, a, topo);
    };
    opt.method = "hierarchical+none+tar";  // the paper's grouping
    const ExpertPlan paper = make_plan(st, topo, opt);
    std::vector<int> per_gpu = {static_cast<int>(paper.layers[0].gpu_experts[0].size()),
                                static_cast<int>(paper.layers[0].gpu_experts[1].size())};
    std::sort(per_gpu.begin(), per_gpu.end());
    EXPECT_EQ(per_gpu, (std::vector<int>{2, 6}));
    opt.method = "priced+none+tar";
    const ExpertPlan priced = make_plan(st, topo, opt);
    EXPECT_EQ(priced.layers[0].gpu_experts[0].size(), 4u);
    EXPECT_EQ(priced.layers[0].gpu_experts[1].size(), 4u);
    const double p = price_of("priced+none+tar");
    double best = std::numeric_limits<double>::infinity();
    for (const char* m : {"hierarchical+none+tar", "hierarchical:0+none+tar", "hierarchical:0.125+none+tar",
                          "hierarchical:0.25+none+tar", "hierarchical:0.5+none+tar", "occult+none+tar"}) {
        const double q = price_of(m);
        EXPECT_LE(p, q * (1 + 1e-12)) << m;
        best = std::min(best, q);
    }
    EXPECT_DOUBLE_EQ(p, best);
}

// The default method: byte-identical plans for any thread count, with and without a slot count.
TEST(PricedSearch, DefaultPlanIsIdenticalForAnyThreadCount) {
    const RoutingStats st = testing::make_random_stats(6, 32, 4, 600, 21);
    for (const Topology& topo : {Topology{2, 4, std::nullopt}, Topology{2, 4, 6}, Topology{4, 2, 5}}) {
        PlanOptions opt;
        opt.num_threads = 1;
        const std::string one = plan_to_json(make_plan(st, topo, opt));
        opt.num_threads = 2;
        EXPECT_EQ(one, plan_to_json(make_plan(st, topo, opt))) << topo.to_string();
        opt.num_threads = 3;
        EXPECT_EQ(one, plan_to_json(make_plan(st, topo, opt))) << topo.to_string();
    }
}

// The default is never dearer, by the planner's own price, than the paper's method, per layer.
TEST(PricedSearch, DefaultIsNoDearerThanThePaperMethod) {
    const RoutingStats st = testing::make_random_stats(4, 32, 4, 800, 5);
    const Topology topo{2, 2, std::nullopt};
    PlanOptions opt;
    const ExpertPlan grace = make_plan(st, topo, opt);
    opt.method = "hierarchical+none+tar";  // the paper's grouping
    const ExpertPlan paper = make_plan(st, topo, opt);
    for (int l = 0; l < st.num_layers; ++l) {
        std::vector<double> load(32);
        for (int e = 0; e < 32; ++e) load[e] = static_cast<double>(st.load_at(l, e));
        EXPECT_LE(price_layer(grace.layers[l], load, {}, topo, opt.pricing),
                  price_layer(paper.layers[l], load, {}, topo, opt.pricing) * (1 + 1e-9))
            << l;
    }
}

}  // namespace
}  // namespace grace
