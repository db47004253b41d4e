// make_plan: method specs, constraints for every method, determinism, bad input.
#include "grace/planner.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <set>

#include "grace/error.hpp"
#include "grace/placement_cost.hpp"
#include "grace/replication.hpp"
#include "unit/planner_test_util.hpp"

namespace grace {
namespace {

using testing::make_random_stats;

const char* kAllGroupings[] = {"vanilla",
                               "occult",
                               "c2r",
                               "spectral-full",
                               "spectral-controlled",
                               "spectral-controlled:0.25",
                               "hierarchical",
                               "metis",
                               "eplb-hierarchical",
                               "eplb-global",
                               "priced"};
const char* kAllReplications[] = {"none", "fixed", "dynamic", "dynamic-iter", "eplb", "priced"};

ErrorCode code_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.code();
    }
    return ErrorCode::kInternal;
}

std::string message_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

TEST(PlannerMethod, ParsesAndPrintsCanonically) {
    EXPECT_EQ(parse_method("grace").to_string(), "priced+priced+tar");
    EXPECT_EQ(parse_method("grace-paper").to_string(), "hierarchical+dynamic+tar");
    EXPECT_EQ(parse_method("eplb").to_string(), "eplb-hierarchical+eplb+sglang-static");
    EXPECT_EQ(parse_method("occult").to_string(), "occult+none+primary");
    const MethodSpec m = parse_method("spectral-controlled:0.3+eplb:72+wrr");
    EXPECT_EQ(m.grouping, "spectral-controlled");
    EXPECT_DOUBLE_EQ(m.controlled_ratio, 0.3);
    EXPECT_EQ(m.replication_slots, 72);
    EXPECT_EQ(m.routing, RoutingPolicy::kWrr);
    EXPECT_EQ(m.to_string(), "spectral-controlled:0.3+eplb:72+wrr");
    EXPECT_EQ(parse_method("spectral-controlled+dynamic").controlled_ratio, -1);
}

TEST(PlannerMethod, RejectsUnknownComponents) {
    for (const char* bad : {"spectral", "occult+dyn", "occult+none+round-robin", "vanilla:0.2", "occult+fixed:3",
                            "spectral-controlled:x", "spectral-controlled:-1", "a+b+c+d", "occult+eplb:0"}) {
        EXPECT_EQ(code_of([&] { parse_method(bad); }), ErrorCode::kInvalidArgument) << bad;
    }
    const std::string msg = message_of([] { parse_method("spectral+none"); });
    EXPECT_NE(msg.find("unknown grouping 'spectral'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("hierarchical"), std::string::npos) << msg;  // lists the valid ones
    EXPECT_EQ(msg.find('\n'), std::string::npos);
    const std::string msg2 = message_of([] { parse_method("occult+dyn"); });
    EXPECT_NE(msg2.find("none, fixed, dynamic, dynamic-iter, eplb"), std::string::npos) << msg2;
}

// Checks every constraint directly (independently of ExpertPlan::validate).
void check_constraints(const ExpertPlan& plan, const std::string& what) {
    const int G = plan.topology.num_gpus(), E = plan.num_experts;
    for (const LayerPlan& lp : plan.layers) {
        std::vector<int> count(E, 0);
        for (int g = 0; g < G; ++g) {
            std::set<int> s(lp.gpu_experts[g].begin(), lp.gpu_experts[g].end());
            ASSERT_EQ(s.size(), lp.gpu_experts[g].size()) << what << ": duplicate on GPU " << g;
            if (plan.topology.slots_per_gpu)
                ASSERT_LE(static_cast<int>(s.size()), *plan.topology.slots_per_gpu) << what;
            for (int e : s) ++count[e];
        }
        for (int e = 0; e < E; ++e) {
            ASSERT_GE(count[e], 1) << what << ": expert " << e << " missing";
            const auto& p = lp.gpu_experts[lp.primary_gpu[e]];
            ASSERT_TRUE(std::binary_search(p.begin(), p.end(), e)) << what;
            int sum = 0;
            for (int w : lp.wrr_weights[e]) sum += w;
            ASSERT_EQ(sum, lp.wrr_period) << what;
        }
    }
}

TEST(Planner, EveryMethodKeepsTheConstraints) {
    const RoutingStats st = make_random_stats(2, 32, 4, 600, 7);
    for (const Topology& topo : {Topology{2, 2, std::nullopt}, Topology{2, 4, 6}, Topology{1, 4, 9}}) {
        for (const char* g : kAllGroupings)
            for (const char* r : kAllReplications) {
                const std::string method = std::string(g) + "+" + r + "+tar";
                PlanOptions opt;
                opt.method = method;
                opt.num_threads = 2;
                ExpertPlan plan;
                ASSERT_NO_THROW(plan = make_plan(st, topo, opt)) << method << " on " << topo.to_string();
                check_constraints(plan, method + " on " + topo.to_string());
                if (std::string(r) != "none" && topo.slots_per_gpu) {
                    // slot-exact: EPLB's default budget, or the priced fill, gives every GPU exactly S instances
                    for (const auto& lp : plan.layers)
                        for (const auto& ex : lp.gpu_experts)
                            EXPECT_EQ(static_cast<int>(ex.size()), *topo.slots_per_gpu) << method;
                }
            }
    }
}

// The fill only adds replicas: the primaries and the DR replicas of the plan with the slot count as an upper
// bound stay; with fill_slots = false the slot count is only an upper bound.
TEST(Planner, SlotFillAddsToTheUnfilledPlan) {
    RoutingStats st = make_random_stats(3, 32, 4, 600, 5);
    Topology topo{2, 2};
    topo.slots_per_gpu = 10;
    PlanOptions opt;
    opt.method = "grace-paper";  // the priced grouping prices its candidates after the fill, so it may choose another
    opt.fill_slots = false;
    opt.priced_moves = 0;
    const ExpertPlan bound = make_plan(st, topo, opt);
    opt.fill_slots = true;
    const ExpertPlan exact = make_plan(st, topo, opt);
    for (int l = 0; l < st.num_layers; ++l) {
        const LayerPlan &b = bound.layers[l], &x = exact.layers[l];
        EXPECT_EQ(b.primary_gpu, x.primary_gpu);
        EXPECT_LT(b.num_instances(), 40);
        EXPECT_EQ(x.num_instances(), 40);
        EXPECT_EQ(x.num_fill_replicas, 40 - b.num_instances());
        for (int g = 0; g < 4; ++g)
            EXPECT_TRUE(std::includes(x.gpu_experts[g].begin(), x.gpu_experts[g].end(), b.gpu_experts[g].begin(),
                                      b.gpu_experts[g].end()));
    }
    // Byte-identical for any thread count, with the fill too.
    opt.num_threads = 1;
    const std::string one = plan_to_json(make_plan(st, topo, opt));
    opt.num_threads = 3;
    EXPECT_EQ(one, plan_to_json(make_plan(st, topo, opt)));
}

// The priced moves after the fill never raise a layer's priced time, keep the plan slot-exact, and leave every
// expert an instance; priced_moves caps them per layer.
TEST(Planner, PricedMovesLowerThePricedTime) {
    RoutingStats st = make_random_stats(4, 32, 4, 800, 9);
    Topology topo{2, 2};
    topo.slots_per_gpu = 10;
    PlanOptions opt;
    opt.method = "grace";
    opt.priced_moves = 0;
    const ExpertPlan filled = make_plan(st, topo, opt);
    opt.priced_moves = -1;
    const ExpertPlan moved = make_plan(st, topo, opt);
    opt.priced_moves = 8;
    PlanOptions defaults;
    defaults.method = "grace";
    const ExpertPlan def = make_plan(st, topo, defaults);
    EXPECT_EQ(plan_to_json(def), plan_to_json(make_plan(st, topo, opt)));  // 8 is the default
    opt.priced_moves = 1;
    const ExpertPlan one = make_plan(st, topo, opt);
    int total = 0;
    for (int l = 0; l < st.num_layers; ++l) {
        std::vector<double> load(32);
        for (int e = 0; e < 32; ++e) load[e] = static_cast<double>(st.load_at(l, e));
        auto price = [&](const LayerPlan& lp) {
            std::vector<std::vector<int>> inst(32);
            for (int g = 0; g < 4; ++g)
                for (int e : lp.gpu_experts[g]) inst[e].push_back(g);
            return LayerCostModel(load, {}, inst, topo, PlacementPricing{}).time();
        };
        EXPECT_LE(price(moved.layers[l]), price(filled.layers[l]) * (1 + 1e-12)) << "layer " << l;
        EXPECT_LE(one.layers[l].num_priced_moves, 1);
        total += moved.layers[l].num_priced_moves;
        for (const auto& ex : moved.layers[l].gpu_experts) EXPECT_EQ(ex.size(), 10u);
    }
    EXPECT_GT(total, 0);  // skewed random statistics leave something to gain
}

TEST(Planner, ReplicationNeverMovesPrimaries) {
    const RoutingStats st = make_random_stats(3, 32, 4, 600, 11);
    const Topology topo{2, 4, 6};
    for (const char* g : kAllGroupings) {
        // The priced grouping prices each candidate after its replication, so its primaries depend on it.
        if (std::string(g) == "priced") continue;
        PlanOptions base;
        base.method = std::string(g) + "+none";
        const ExpertPlan p0 = make_plan(st, topo, base);
        for (const char* r : {"fixed", "dynamic", "dynamic-iter", "eplb"}) {
            if (std::string(r) == "eplb" && std::string(g).rfind("eplb", 0) == 0) continue;  // EPLB places anew
            PlanOptions opt;
            opt.method = std::string(g) + "+" + r;
            opt.priced_moves = 0;  // replication and the fill only add; the priced moves rewrite (tested below)
            const ExpertPlan p1 = make_plan(st, topo, opt);
            for (int l = 0; l < st.num_layers; ++l) {
                EXPECT_EQ(p0.layers[l].primary_gpu, p1.layers[l].primary_gpu) << opt.method << " layer " << l;
                for (int gpu = 0; gpu < topo.num_gpus(); ++gpu)
                    for (int e : p0.layers[l].gpu_experts[gpu])
                        EXPECT_TRUE(std::binary_search(p1.layers[l].gpu_experts[gpu].begin(),
                                                       p1.layers[l].gpu_experts[gpu].end(), e))
                            << opt.method;
                EXPECT_EQ(p0.layers[l].gpu_load_before, p1.layers[l].gpu_load_before);
            }
        }
    }
}

TEST(Planner, GracePaperRecordsDiagnostics) {
    const RoutingStats st = make_random_stats(2, 32, 4, 800, 3);
    PlanOptions opt;
    opt.method = "grace-paper";
    const ExpertPlan plan = make_plan(st, Topology{2, 4, std::nullopt}, opt);
    EXPECT_EQ(plan.method, "hierarchical+dynamic+tar");
    for (const LayerPlan& lp : plan.layers) {
        EXPECT_EQ(lp.policy, RoutingPolicy::kTar);
        EXPECT_EQ(lp.knee_curves.size(), 2u);
        EXPECT_GE(lp.r_star, 0);
        // gamma and R follow from gpu_load_before (Equation 3), and predicted loads sum to the total load.
        EXPECT_NEAR(lp.gamma, load_skew(lp.gpu_load_before), 1e-12);
        EXPECT_EQ(lp.num_replicas, replica_count(lp.gamma, 8));
        double before = 0, after = 0;
        for (double x : lp.gpu_load_before) before += x;
        for (double x : lp.predicted_gpu_load) after += x;
        EXPECT_NEAR(before, after, 1e-6 * before);
        EXPECT_LE(*std::max_element(lp.predicted_gpu_load.begin(), lp.predicted_gpu_load.end()),
                  *std::max_element(lp.gpu_load_before.begin(), lp.gpu_load_before.end()) + 1e-9);
        // every hot expert is a primary of the heaviest GPU and has R replicas (no slot limit here)
        const int heavy = static_cast<int>(std::max_element(lp.gpu_load_before.begin(), lp.gpu_load_before.end()) -
                                           lp.gpu_load_before.begin());
        for (int e : lp.hot_experts) {
            EXPECT_EQ(lp.primary_gpu[e], heavy);
            EXPECT_EQ(static_cast<int>(lp.instance_gpus[e].size()), lp.num_replicas + 1);
        }
    }
}

TEST(Planner, ByteIdenticalForAnyThreadCount) {
    const RoutingStats st = make_random_stats(6, 32, 4, 500, 5);
    for (const char* method : {"grace", "metis+dynamic+wrr", "spectral-controlled+eplb+tar", "eplb", "occult+fixed"}) {
        PlanOptions opt;
        opt.method = method;
        opt.seed = 42;
        opt.num_threads = 1;
        omp_set_num_threads(1);
        const std::string one = plan_to_json(make_plan(st, Topology{2, 4, 8}, opt));
        opt.num_threads = 2;
        omp_set_num_threads(2);
        const std::string two = plan_to_json(make_plan(st, Topology{2, 4, 8}, opt));
        opt.num_threads = 0;
        const std::string all = plan_to_json(make_plan(st, Topology{2, 4, 8}, opt));
        EXPECT_EQ(one, two) << method;
        EXPECT_EQ(one, all) << method;
    }
    omp_set_num_threads(omp_get_num_procs());
}

TEST(Planner, VanillaIsContiguous) {
    const RoutingStats st = make_random_stats(1, 16, 2, 100, 1);
    PlanOptions opt;
    opt.method = "vanilla";
    const ExpertPlan plan = make_plan(st, Topology{2, 2, std::nullopt}, opt);
    for (int e = 0; e < 16; ++e) EXPECT_EQ(plan.layers[0].primary_gpu[e], e / 4);
}

TEST(Planner, BadInputIsOneLineInvalidArgument) {
    const RoutingStats st = make_random_stats(1, 8, 2, 100, 1);
    PlanOptions opt;
    auto expect_arg = [](const std::function<void()>& f, const std::string& needle) {
        const std::string msg = message_of(f);
        EXPECT_EQ(code_of(f), ErrorCode::kInvalidArgument) << msg;
        EXPECT_NE(msg.find(needle), std::string::npos) << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos);
    };
    // more GPUs than experts
    expect_arg([&] { make_plan(st, Topology{4, 4, std::nullopt}, opt); }, "16 GPUs but the statistics have only 8");
    // too few slots
    expect_arg([&] { make_plan(st, Topology{1, 4, 1}, opt); }, "too few for the 8 experts");
    // unknown method component
    opt.method = "hierarchical+dynamo";
    expect_arg([&] { make_plan(st, Topology{1, 4, std::nullopt}, opt); }, "unknown replication 'dynamo'");
    opt.method = "grace";
    // NxM with a zero
    expect_arg([&] { make_plan(st, Topology{0, 4, std::nullopt}, opt); }, "");
    expect_arg([] { Topology::parse("2x0"); }, "");
    // knee search with a single point: 8 experts on 8 GPUs leaves only the uniform grouping
    opt.method = "spectral-controlled+none";
    expect_arg([&] { make_plan(st, Topology{2, 4, std::nullopt}, opt); }, "");
    // malformed statistics are kInvalidInput
    RoutingStats broken = st;
    broken.affinity[1] += 1;  // asymmetric
    opt.method = "grace";
    EXPECT_EQ(code_of([&] { make_plan(broken, Topology{1, 2, std::nullopt}, opt); }), ErrorCode::kInvalidInput);
}

}  // namespace
}  // namespace grace

namespace grace {
namespace {

// EPLB's global policy on the spec §8 golden input puts both replicas of expert 1 on GPU 7
// (phy2log row 0 = [10,6, 10,7, 0,2, 11,4, 5,9, 5,4, 8,3, 1,1]). The planner swaps the duplicate with the replica
// whose load per replica is closest (expert 1: 132/2 = 66; expert 3 on GPU 6: 61), keeping EPLB's counts.
TEST(Planner, EplbDuplicateIsSwappedAway) {
    RoutingStats st;
    st.num_layers = 1;
    st.num_experts = 12;
    st.top_k = 1;
    st.load = {90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86};
    st.affinity.assign(144, 0);
    PlanOptions opt;
    opt.method = "eplb-global+eplb:16";
    const ExpertPlan plan = make_plan(st, Topology{2, 4, std::nullopt}, opt);
    const LayerPlan& lp = plan.layers[0];
    EXPECT_EQ(lp.gpu_experts,
              (std::vector<std::vector<int>>{{6, 10}, {7, 10}, {0, 2}, {4, 11}, {5, 9}, {4, 5}, {1, 8}, {1, 3}}));
    EXPECT_EQ(lp.primary_gpu[1], 6);
    EXPECT_EQ(lp.primary_gpu[3], 7);
    const std::vector<int> logcnt = {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1};
    for (int e = 0; e < 12; ++e) EXPECT_EQ(static_cast<int>(lp.instance_gpus[e].size()), logcnt[e]) << e;
}

}  // namespace
}  // namespace grace

namespace grace {
namespace {

TEST(Planner, HierarchicalNodeRatioBoundsNodeSizes) {
    EXPECT_EQ(parse_method("hierarchical:0.25+dynamic+tar").to_string(), "hierarchical:0.25+dynamic+tar");
    EXPECT_EQ(parse_method("hierarchical:0.25").node_ratio, 0.25);
    EXPECT_EQ(parse_method("hierarchical").node_ratio, -1);
    EXPECT_THROW(parse_method("hierarchical:x"), Error);
    const RoutingStats st = testing::make_random_stats(4, 32, 4, 800, 9, 2);
    const Topology topo{2, 2, std::nullopt};
    for (double r : {0.0, 0.25}) {
        PlanOptions o;
        o.method = "hierarchical:" + std::to_string(r).substr(0, 4) + "+none+primary";
        const ExpertPlan plan = make_plan(st, topo, o);
        // Node group sizes (primaries per node) within [max(M, floor((1-r)E/N)), ceil((1+r)E/N)], E/N = 16.
        const int lo = std::max(2, static_cast<int>(std::floor((1 - r) * 16))),
                  hi = static_cast<int>(std::ceil((1 + r) * 16));
        for (const LayerPlan& lp : plan.layers) {
            int node0 = 0;
            for (int e = 0; e < 32; ++e) node0 += topo.node_of(lp.primary_gpu[e]) == 0;
            EXPECT_GE(node0, lo) << "r=" << r;
            EXPECT_LE(node0, hi) << "r=" << r;
            EXPECT_GE(32 - node0, lo) << "r=" << r;
        }
    }
}

}  // namespace
}  // namespace grace
