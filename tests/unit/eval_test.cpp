#include "grace/eval.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/rng.hpp"
#include "grace/error.hpp"
#include "grace/hardware.hpp"
#include "grace/routing.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

// 2x2 (GPUs 0,1 on node 0; 2,3 on node 1), E = 5, k = 2, one layer.
// Instances (primary first): e0 [0, 2], e1 [1], e2 [3, 0], e3 [2, 3], e4 [3]; uniform WRR weights.
ExpertPlan hand_plan(RoutingPolicy policy) {
    ExpertPlan p;
    p.num_experts = 5;
    p.num_layers = 1;
    p.top_k = 2;
    p.topology = Topology{2, 2, std::nullopt};
    p.method = "hand";
    LayerPlan lp;
    lp.gpu_experts = {{0, 2}, {1}, {0, 3}, {2, 3, 4}};
    lp.primary_gpu = {0, 1, 3, 2, 3};
    lp.policy = policy;
    lp.finalize(5);
    p.layers = {lp};
    p.validate();
    return p;
}

RoutingTrace hand_trace() {
    RoutingTrace t;
    t.num_tokens = 8;
    t.num_layers = 1;
    t.top_k = 2;
    t.num_experts = 5;
    t.model = "hand";
    // Homes: t0,t1 -> GPU 0; t2,t3 -> 1; t4,t5 -> 2; t6,t7 -> 3.
    t.expert_ids = {3, 4, 3, 2, 0, 2, 2, 3, 0, 1, 2, 3, 0, 2, 1, 0};
    t.validate();
    return t;
}

std::vector<int64_t> matrix(std::initializer_list<std::tuple<int, int, int64_t>> entries, int G = 4) {
    std::vector<int64_t> m(G * G, 0);
    for (auto [s, d, v] : entries) m[s * G + d] = v;
    return m;
}

// Worked by hand (see the comments): TAR picks the same GPU, else the same node, else WRR over all, and the
// WRR counter is per (source GPU, expert). e3 from GPU 0 alternates 2, 3; from GPU 1 it starts at 2.
//   t0 (h0) [3,4] -> 2, 3      t1 (h0) [3,2] -> 3, 0(local)   t2 (h1) [0,2] -> 0, 0   t3 (h1) [2,3] -> 0, 2
//   t4 (h2) [0,1] -> 2(l), 1   t5 (h2) [2,3] -> 3, 2(l)       t6 (h3) [0,2] -> 2, 3(l) t7 (h3) [1,0] -> 1, 2
TEST(Replay, TarHandWorkedExample) {
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    const RoutingTrace trace = hand_trace();
    const auto counts = replay_trace(trace, plan);
    ASSERT_EQ(counts.size(), 1u);
    const LayerCounts& c = counts[0];
    EXPECT_EQ(c.local_selections, 4);
    EXPECT_EQ(c.instance_load, (std::vector<std::vector<int64_t>>{{1, 3}, {2}, {2, 3}, {3, 1}, {1}}));
    EXPECT_EQ(c.gpu_load, (std::vector<int64_t>{4, 2, 6, 4}));
    EXPECT_EQ(c.flat.copies,
              matrix({{0, 2, 1}, {0, 3, 2}, {1, 0, 3}, {1, 2, 1}, {2, 1, 1}, {2, 3, 1}, {3, 1, 1}, {3, 2, 2}}));
    EXPECT_EQ(c.flat.cross_node_copies, 6);
    EXPECT_EQ(c.flat.intra_node_copies, 6);
    EXPECT_EQ(c.flat_dedup.copies,
              matrix({{0, 2, 1}, {0, 3, 2}, {1, 0, 2}, {1, 2, 1}, {2, 1, 1}, {2, 3, 1}, {3, 1, 1}, {3, 2, 2}}));
    EXPECT_EQ(c.flat_dedup.cross_node_copies, 6);
    EXPECT_EQ(c.flat_dedup.intra_node_copies, 5);
    // HSC: cross copies go to the peer b*M + h%M, which forwards inside its node.
    EXPECT_EQ(c.hsc.copies,
              matrix({{0, 2, 2}, {2, 3, 3}, {1, 0, 2}, {1, 3, 1}, {3, 2, 3}, {2, 0, 1}, {0, 1, 1}, {3, 1, 1}}));
    EXPECT_EQ(c.hsc.cross_node_copies, 5);
    EXPECT_EQ(c.hsc.intra_node_copies, 9);
    EXPECT_EQ(&c.traffic(CommScheme::k2dh), &c.flat);
    // count_traffic gives the same matrix.
    EXPECT_EQ(count_traffic(trace, plan, RoutingPolicy::kTar, CommScheme::kHsc, 0).copies, c.hsc.copies);
}

TEST(Replay, PrimaryRoutingIgnoresReplicas) {
    const auto c = replay_trace(hand_trace(), hand_plan(RoutingPolicy::kTar), {RoutingPolicy::kPrimary})[0];
    EXPECT_EQ(c.instance_load, (std::vector<std::vector<int64_t>>{{4, 0}, {2}, {5, 0}, {4, 0}, {1}}));
    EXPECT_EQ(c.gpu_load, (std::vector<int64_t>{4, 2, 4, 6}));
}

HardwareModel test_hardware() {
    HardwareModel hw;
    hw.name = "test";
    hw.element_size = 2;
    hw.intra_node_bandwidth = 1e7;
    hw.cross_node_bandwidth = 1e6;
    hw.intra_node_latency = 1e-6;
    hw.cross_node_latency = 1e-5;
    hw.peak_flops = 1e12;
    hw.n_half = 0;
    hw.non_moe_seconds_per_token = 1e-3;
    return hw;
}

// 1000 bytes per copy. flat: node 0 sends 4 copies across = 4000 B at 1e6 B/s = 4 ms; the largest intra-node
// volume is GPU 1's 3 copies = 0.3 ms; the busiest GPU has 2 cross messages and 1 intra message: 21 us.
// hsc: 3 ms + 2 messages * 10 us (stage 1), then 0.3 ms + 1 message * 1 us (stage 2).
TEST(Pricing, HandWorkedAllToAllTimes) {
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    const RoutingTrace trace = hand_trace();
    EvalOptions opt;
    opt.hardware = test_hardware();
    opt.shape = ModelShape{"hand", 500, 1000};
    opt.scheme = CommScheme::kFlat;
    EvalReport flat = evaluate(trace, plan, opt);
    EXPECT_NEAR(flat.layers[0].dispatch_time_s, 4e-3 + 21e-6, 1e-12);
    EXPECT_EQ(flat.total.cross_node_bytes, 6000);
    opt.scheme = CommScheme::kHsc;
    EvalReport hsc = evaluate(trace, plan, opt);
    // Stage-1 messages: GPU 0 sends 1 (to 2) and receives 1 (from 2): 1 message each way, 10 us.
    EXPECT_NEAR(hsc.layers[0].dispatch_time_s, 3e-3 + 10e-6 + 3e-4 + 1e-6, 1e-12);
    EXPECT_EQ(hsc.total.cross_node_copies, 5);
    EXPECT_EQ(hsc.total.intra_node_copies, 9);
    // Compute: f(n) = 6*H*I*n/peak = 3e-6 s per token; loads 4, 2, 6, 4 -> max 18 us, mean 12 us.
    EXPECT_NEAR(hsc.layers[0].compute_time_s, 18e-6, 1e-15);
    EXPECT_NEAR(hsc.layers[0].gpu_idle_time_s, 6e-6, 1e-15);
    EXPECT_NEAR(hsc.layers[0].balancedness, 4.0 / 6.0, 1e-12);
    EXPECT_NEAR(hsc.layers[0].imbalance_ratio, 0.5, 1e-12);
    EXPECT_NEAR(hsc.layers[0].load_std, std::sqrt(2.0), 1e-12);
    EXPECT_NEAR(hsc.layers[0].moe_layer_time_s, 2 * hsc.layers[0].dispatch_time_s + 18e-6, 1e-15);
    EXPECT_NEAR(hsc.total.end_to_end_s, hsc.layers[0].moe_layer_time_s + 2 * 1e-3, 1e-15);
    EXPECT_NEAR(hsc.total.cross_node_ratio, 5.0 / 14.0, 1e-12);
}

ExpertPlan random_plan(Rng& rng, int E, int L, int k, Topology topo, RoutingPolicy policy) {
    ExpertPlan p;
    p.num_experts = E;
    p.num_layers = L;
    p.top_k = k;
    p.topology = topo;
    p.seed = rng.next();
    const int G = topo.num_gpus();
    for (int l = 0; l < L; ++l) {
        LayerPlan lp;
        lp.layer = l;
        lp.gpu_experts.assign(G, {});
        lp.primary_gpu.resize(E);
        for (int e = 0; e < E; ++e) {
            int g = static_cast<int>(rng.next() % G);
            lp.primary_gpu[e] = g;
            lp.gpu_experts[g].push_back(e);
            for (int r = 0; r < G; ++r)
                if (r != g && rng.next() % 5 == 0) lp.gpu_experts[r].push_back(e);
        }
        lp.policy = policy;
        lp.finalize(E);
        for (int e = 0; e < E; ++e) {
            std::vector<double> w;
            for (size_t i = 0; i < lp.instance_gpus[e].size(); ++i) w.push_back(1.0 + rng.next() % 7);
            lp.wrr_weights[e] = round_weights(w, lp.wrr_period);
        }
        p.layers.push_back(std::move(lp));
    }
    p.validate();
    return p;
}

RoutingTrace random_trace(Rng& rng, int64_t T, int L, int k, int E) {
    RoutingTrace t;
    t.num_tokens = T;
    t.num_layers = L;
    t.top_k = k;
    t.num_experts = E;
    t.expert_ids.resize(T * L * k);
    for (int64_t i = 0; i < T * L; ++i) {
        std::vector<int> pick;
        while (static_cast<int>(pick.size()) < k) {
            // Skewed: low ids are hotter.
            int e = static_cast<int>((rng.next() % E) * (rng.next() % E) / E);
            if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
        }
        for (int j = 0; j < k; ++j) t.expert_ids[i * k + j] = pick[j];
    }
    return t;
}

// Expects `stmt` to throw a grace::Error whose message contains `part`.
#define EXPECT_THROW_MSG(stmt, part)                                                  \
    do {                                                                              \
        const std::string msg_ = testing::error_of([&] { stmt; });                    \
        EXPECT_NE(msg_.find(part), std::string::npos) << "message: '" << msg_ << "'"; \
    } while (0)
// Two batches of 4 tokens (--batch-tokens 4): each batch spreads its tokens over the 4 GPUs (homes 0, 1, 2, 3)
// and is priced on its own; the WRR counters carry over. Worked by hand (TAR; destinations after the arrows):
//   batch 0: t0 (h0) [3,4] -> 2, 3   t1 (h1) [3,2] -> 2, 0   t2 (h2) [0,2] -> 2(l), 3   t3 (h3) [2,3] -> 3(l), 3(l)
//   batch 1: t4 (h0) [0,1] -> 0(l), 1  t5 (h1) [2,3] -> 0, 3  t6 (h2) [0,2] -> 2(l), 3  t7 (h3) [1,0] -> 1, 2
// t5's e3 goes to GPU 3 because GPU 1's e3 counter already picked GPU 2 for t1 (reset, it would pick 2 again).
// hsc copies, batch 0: 0->2 and 1->3 across, 2->3 (x2), 1->0, 3->2 inside; loads [1, 0, 3, 4].
//   dispatch = 2 copies out of node 0 (2 ms) + 1 message (10 us) + 2 copies out of GPU 2 (0.2 ms) + 1 us.
// batch 1: 1->3 and 3->1 across, 0->1, 1->0, 2->3, 3->2 inside; loads [2, 2, 2, 2].
//   dispatch = 1 ms + 10 us + 0.1 ms + 1 us.
// Compute 3 us per selection; non-MoE 1 ms per batch (ceil(4/4) tokens on the busiest GPU).
TEST(BatchedEval, HandWorkedTwoBatches) {
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    EvalOptions opt;
    opt.hardware = test_hardware();
    opt.shape = ModelShape{"hand", 500, 1000};
    opt.scheme = CommScheme::kHsc;
    opt.batching.batch_tokens = 4;
    const EvalReport r = evaluate(hand_trace(), plan, opt);
    const double d0 = 2e-3 + 10e-6 + 2e-4 + 1e-6, d1 = 1e-3 + 10e-6 + 1e-4 + 1e-6;
    const double e0 = 2 * d0 + 12e-6 + 1e-3, e1 = 2 * d1 + 6e-6 + 1e-3;
    const EvalMetrics& m = r.layers[0];
    EXPECT_NEAR(m.dispatch_time_s, d0 + d1, 1e-12);
    EXPECT_NEAR(m.all_to_all_time_s, 2 * (d0 + d1), 1e-12);
    EXPECT_NEAR(m.compute_time_s, 12e-6 + 6e-6, 1e-15);
    EXPECT_NEAR(m.gpu_idle_time_s, 6e-6, 1e-15);
    EXPECT_NEAR(m.non_moe_time_s, 2e-3, 1e-15);
    EXPECT_NEAR(r.total.end_to_end_s, e0 + e1, 1e-12);
    EXPECT_EQ(m.cross_node_copies, 4);
    EXPECT_EQ(m.intra_node_copies, 8);
    EXPECT_EQ(m.local_selections, 5);
    EXPECT_EQ(m.gpu_load, (std::vector<int64_t>{3, 2, 5, 6}));
    EXPECT_EQ(m.instance_load, (std::vector<std::vector<int64_t>>{{1, 3}, {2}, {3, 2}, {2, 2}, {1}}));
    // Token-weighted over the two equal batches: imbalance (1 + 0) / 2, balancedness (0.5 + 1) / 2.
    EXPECT_NEAR(m.imbalance_ratio, 0.5, 1e-12);
    EXPECT_NEAR(m.balancedness, 0.75, 1e-12);
    EXPECT_EQ(r.num_tokens, 8);
    ASSERT_EQ(r.phases.size(), 1u);
    const PhaseReport& p = r.phases[0];
    EXPECT_EQ(p.phase, BatchPhase::kPrefill);
    EXPECT_EQ(p.num_batches, 2);
    EXPECT_EQ(p.num_tokens, 8);
    EXPECT_EQ(p.min_batch_tokens, 4);
    EXPECT_EQ(p.max_batch_tokens, 4);
    EXPECT_NEAR(p.batch_end_to_end_min_s, e1, 1e-12);
    EXPECT_NEAR(p.batch_end_to_end_max_s, e0, 1e-12);
    EXPECT_NEAR(p.batch_end_to_end_mean_s, (e0 + e1) / 2, 1e-12);
    EXPECT_NEAR(p.total.end_to_end_s, e0 + e1, 1e-12);
}

// Workload 2x2+2 on the same 8 tokens: the prefill is batch 0 above (tokens 0-3), then two decode batches of 2
// tokens (4-5 and 6-7), whose tokens start on GPUs 0 and 2 (home_gpu(i, 2, 4)).
TEST(BatchedEval, WorkloadSplitsPrefillAndDecode) {
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    EvalOptions opt;
    opt.hardware = test_hardware();
    opt.shape = ModelShape{"hand", 500, 1000};
    opt.batching.workload = parse_workload("2x2+2");
    const EvalReport r = evaluate(hand_trace(), plan, opt);
    ASSERT_EQ(r.phases.size(), 2u);
    const PhaseReport &pre = r.phases[0], &dec = r.phases[1];
    EXPECT_EQ(pre.num_batches, 1);
    EXPECT_EQ(pre.num_tokens, 4);
    EXPECT_NEAR(pre.total.end_to_end_s, 2 * (2e-3 + 10e-6 + 2e-4 + 1e-6) + 12e-6 + 1e-3, 1e-12);
    EXPECT_EQ(dec.phase, BatchPhase::kDecode);
    EXPECT_EQ(dec.num_batches, 2);
    EXPECT_EQ(dec.num_tokens, 4);
    EXPECT_EQ(dec.max_batch_tokens, 2);
    // Every selection is counted once, prefill and decode together.
    int64_t load = 0;
    for (int64_t v : r.layers[0].gpu_load) load += v;
    EXPECT_EQ(load, 16);
    EXPECT_NEAR(r.total.end_to_end_s, pre.total.end_to_end_s + dec.total.end_to_end_s, 1e-12);
    EXPECT_EQ(r.total.cross_node_copies, pre.total.cross_node_copies + dec.total.cross_node_copies);
    // Decode token t4 (GPU 0) [0,1] -> 0(l), 1; t5 (GPU 2) [2,3] -> 3, 2(l): batch of 2, non-MoE 1 ms each.
    EXPECT_NEAR(dec.total.non_moe_time_s, 2e-3, 1e-15);
    // A trace shorter than one round is an error naming both numbers.
    opt.batching.workload = parse_workload("3x2+1");
    EXPECT_THROW_MSG(evaluate(hand_trace(), plan, opt), "needs 9 tokens but the trace has 8");
}

TEST(BatchedEval, OneBatchEqualsTheWholeTraceAndThreadsDoNotMatter) {
    Rng rng(3);
    // 2x4 counts destination sets as bit masks, 4x4 (G > 12) straight into the matrices: both reset per batch.
    for (const Topology topo : {Topology{2, 4, std::nullopt}, Topology{4, 4, std::nullopt}}) {
        SCOPED_TRACE(topo.to_string());
        const ExpertPlan plan = random_plan(rng, 32, 3, 4, topo, RoutingPolicy::kTar);
        const RoutingTrace trace = random_trace(rng, 1001, 3, 4, 32);
        EvalOptions opt;
        opt.hardware = load_hardware("a100-testbed");
        opt.shape = ModelShape{"", 2048, 1024};
        const ModelShape shape = *opt.shape;
        const std::string whole = report_to_json(evaluate(trace, plan, opt));
        // price_counts on one replay of the whole trace, as before batches existed.
        EvalReport direct = price_counts(replay_trace(trace, plan), plan, opt.scheme, opt.hardware, shape, 1001);
        direct.policy = "tar";
        EvalReport batched_whole = evaluate(trace, plan, opt);
        // Every field of every row, to the last digit (the CSV prints 9 significant digits; the doubles are equal).
        EXPECT_EQ(report_to_csv(batched_whole), report_to_csv(direct));
        EXPECT_EQ(batched_whole.total.end_to_end_s, direct.total.end_to_end_s);
        EXPECT_EQ(batched_whole.total.load_std, direct.total.load_std);
        EXPECT_EQ(batched_whole.layers[2].imbalance_ratio, direct.layers[2].imbalance_ratio);
        EXPECT_EQ(batched_whole.layers[1].copies, direct.layers[1].copies);
        EXPECT_EQ(batched_whole.layers[1].instance_load, direct.layers[1].instance_load);
        opt.batching.batch_tokens = 5000;  // more than the trace: one batch
        EXPECT_EQ(report_to_json(evaluate(trace, plan, opt)).size(), whole.size());
        // Batched, 1 vs 2 threads, and fed in chunks that straddle batch boundaries: the same bytes.
        opt.batching.batch_tokens = 0;
        opt.batching.workload = parse_workload("16x40+20");  // 960 tokens a round, 41 left over
        opt.replay.num_threads = 1;
        const std::string one = report_to_json(evaluate(trace, plan, opt));
        opt.replay.num_threads = 2;
        EXPECT_EQ(report_to_json(evaluate(trace, plan, opt)), one);
        BatchedEval chunked(plan, make_batch_schedule(1001, opt.batching), {opt.scheme}, opt.hardware, shape,
                            opt.replay);
        for (int64_t b = 0; b < trace.num_tokens; b += 97)
            chunked.consume(trace.slice_tokens(b, std::min<int64_t>(b + 97, 1001)), b);
        EvalReport r = chunked.report();
        r.policy = "tar";
        EXPECT_EQ(report_to_json(r), one);
        EXPECT_EQ(r.num_tokens, 960);
        EXPECT_EQ(r.schedule.trace_tokens - r.schedule.num_tokens(), 41);
    }
}

TEST(Workload, ParsesSpecsAndRejectsBadOnes) {
    const WorkloadSpec w = parse_workload("256x128+16");
    EXPECT_EQ(w.sequences, 256);
    EXPECT_EQ(w.prefill_tokens, 128);
    EXPECT_EQ(w.decode_steps, 16);
    EXPECT_EQ(w.tokens_per_round(), 36864);
    EXPECT_EQ(to_string(w), "256x128+16");
    EXPECT_EQ(parse_workload("4x3+0").tokens_per_round(), 12);
    EXPECT_THROW_MSG(parse_workload("256x"), "is not SxP+D");
    EXPECT_THROW_MSG(parse_workload("0x1+1"), "S (sequences) must be >= 1, got 0");
    EXPECT_THROW_MSG(parse_workload("4x0+1"), "P (prefill tokens) must be >= 1");
    EXPECT_THROW_MSG(parse_workload("4x-1+1"), "is not a whole number");
    EXPECT_THROW_MSG(parse_workload("4x 1+1"), "is not a whole number");
    EXPECT_THROW_MSG(parse_workload("99999999999x99999999999+1"), "do not fit in 64 bits");
    EXPECT_THROW_MSG(parse_workload("99999999999999999999x1+1"), "does not fit in 64 bits");
}

TEST(Workload, SchedulesCutTheTraceInOrder) {
    BatchingOptions o;
    o.batch_tokens = 4;
    BatchSchedule s = make_batch_schedule(10, o);
    ASSERT_EQ(s.round.size(), 2u);
    EXPECT_EQ(s.round[0].batch_tokens, 4);
    EXPECT_EQ(s.round[0].count, 2);
    EXPECT_EQ(s.round[1].batch_tokens, 2);
    EXPECT_EQ(s.num_batches(), 3);
    EXPECT_EQ(s.num_tokens(), 10);
    o.workload = parse_workload("3x5+2");  // prefill 15 tokens in batches of 4, then 2 decode batches of 3
    s = make_batch_schedule(50, o);
    EXPECT_EQ(s.rounds, 2);
    EXPECT_EQ(s.num_tokens(), 42);
    EXPECT_EQ(s.num_batches(), 2 * (3 + 1 + 2));
    EXPECT_EQ(s.round.back().phase, BatchPhase::kDecode);
    EXPECT_EQ(s.round.back().batch_tokens, 3);
    EXPECT_TRUE(make_batch_schedule(7, {}).whole_trace());
    EXPECT_THROW_MSG(make_batch_schedule(20, o), "needs 21 tokens but the trace has 20");
}

TEST(Replay, SchemeInvariantsOnRandomPlans) {
    Rng rng(7);
    const Topology topos[] = {{1, 2, std::nullopt}, {2, 2, std::nullopt}, {2, 4, std::nullopt}, {4, 4, std::nullopt}};
    const RoutingPolicy policies[] = {RoutingPolicy::kPrimary,      RoutingPolicy::kWrr,
                                      RoutingPolicy::kTar,          RoutingPolicy::kVllm,
                                      RoutingPolicy::kSglangStatic, RoutingPolicy::kSglangDynamic};
    for (int trial = 0; trial < 24; ++trial) {
        const Topology topo = topos[trial % 4];
        const int E = 8 + static_cast<int>(rng.next() % 40), k = 1 + static_cast<int>(rng.next() % 6);
        const ExpertPlan plan = random_plan(rng, E, 2, k, topo, policies[trial % 6]);
        const RoutingTrace trace = random_trace(rng, 300 + static_cast<int64_t>(rng.next() % 300), 2, k, E);
        for (const LayerCounts& c : replay_trace(trace, plan)) {
            SCOPED_TRACE(::testing::Message() << "trial " << trial << " layer " << c.layer);
            EXPECT_LE(c.hsc.cross_node_copies, c.flat_dedup.cross_node_copies);
            EXPECT_LE(c.flat_dedup.cross_node_copies, c.flat.cross_node_copies);
            EXPECT_LE(c.flat_dedup.intra_node_copies, c.flat.intra_node_copies);
            EXPECT_EQ(c.flat.cross_node_copies + c.flat.intra_node_copies + c.local_selections, trace.num_tokens * k);
            int64_t sum = 0;
            for (int64_t v : c.gpu_load) sum += v;
            EXPECT_EQ(sum, trace.num_tokens * k);
            if (topo.nodes == 1) EXPECT_EQ(c.hsc.copies, c.flat_dedup.copies);
        }
    }
}

TEST(Replay, ChunksAndThreadsGiveIdenticalCounts) {
    Rng rng(11);
    const Topology topo{2, 4, std::nullopt};
    for (RoutingPolicy policy :
         {RoutingPolicy::kWrr, RoutingPolicy::kTar, RoutingPolicy::kVllm, RoutingPolicy::kSglangDynamic}) {
        const ExpertPlan plan = random_plan(rng, 32, 3, 4, topo, policy);
        const RoutingTrace trace = random_trace(rng, 1001, 3, 4, 32);
        ReplayOptions one;
        one.num_threads = 1;
        const auto whole = replay_trace(trace, plan, one);
        ReplayOptions two;
        two.num_threads = 2;
        Replayer r(plan, trace.num_tokens, two);
        for (int64_t b = 0; b < trace.num_tokens; b += 97)
            r.consume(trace.slice_tokens(b, std::min<int64_t>(b + 97, 1001)), b);
        const auto chunked = r.counts();
        for (int l = 0; l < 3; ++l) {
            EXPECT_EQ(whole[l].flat.copies, chunked[l].flat.copies);
            EXPECT_EQ(whole[l].flat_dedup.copies, chunked[l].flat_dedup.copies);
            EXPECT_EQ(whole[l].hsc.copies, chunked[l].hsc.copies);
            EXPECT_EQ(whole[l].instance_load, chunked[l].instance_load);
        }
    }
}

// The replay's routing tables must pick exactly what ReplicaRouter::route picks, token by token, and its
// copy matrices must equal a direct per-token application of spec §6's table (both the small-G bit-set path
// and the large-G path).
TEST(Replay, MatchesReplicaRouterCallByCall) {
    Rng rng(5);
    for (Topology topo : {Topology{2, 4, std::nullopt}, Topology{4, 4, std::nullopt}}) {
        const int G = topo.num_gpus(), M = topo.gpus_per_node;
        for (RoutingPolicy policy :
             {RoutingPolicy::kWrr, RoutingPolicy::kTar, RoutingPolicy::kSglangStatic, RoutingPolicy::kVllm,
              RoutingPolicy::kSglangDynamic, RoutingPolicy::kPrimary, RoutingPolicy::kSglangNearest,
              RoutingPolicy::kVllmAscend, RoutingPolicy::kTrtllm}) {
            const ExpertPlan plan = random_plan(rng, 24, 2, 3, topo, policy);
            const RoutingTrace trace = random_trace(rng, 777, 2, 3, 24);
            const auto counts = replay_trace(trace, plan);
            // The whole model's routers: SGLang's static tables run one random stream over all layers.
            auto routers = make_layer_routers(plan, policy, plan.seed);
            for (int l = 0; l < 2; ++l) {
                ReplicaRouter& router = *routers[l];
                // The engines see per-rank token indices: each source's first token is its origin.
                for (int64_t t = 0; t < trace.num_tokens; ++t)
                    if (t == 0 || home_gpu(t - 1, trace.num_tokens, G) != home_gpu(t, trace.num_tokens, G))
                        router.set_token_origin(home_gpu(t, trace.num_tokens, G), t);
                std::vector<int64_t> flat(G * G, 0), dedup(G * G, 0), hsc(G * G, 0);
                std::vector<std::vector<int64_t>> inst(24);
                for (int e = 0; e < 24; ++e) inst[e].assign(plan.layers[l].instance_gpus[e].size(), 0);
                for (int64_t t = 0; t < trace.num_tokens; ++t) {
                    const int h = home_gpu(t, trace.num_tokens, G);
                    std::vector<int> dsts;
                    for (int j = 0; j < 3; ++j) {
                        const int e = trace.id(t, l, j);
                        const int d = router.route(h, e, t, j, 3);
                        ++inst[e][router.last_instance()];
                        if (d != h) ++flat[h * G + d];
                        if (std::find(dsts.begin(), dsts.end(), d) == dsts.end()) dsts.push_back(d);
                    }
                    std::vector<int> nodes;
                    for (int d : dsts) {
                        if (d != h) ++dedup[h * G + d];
                        const int b = d / M, peer = b * M + h % M;
                        if (b == h / M) {
                            if (d != h) ++hsc[h * G + d];
                            continue;
                        }
                        if (std::find(nodes.begin(), nodes.end(), b) == nodes.end()) {
                            nodes.push_back(b);
                            ++hsc[h * G + peer];
                        }
                        if (d != peer) ++hsc[peer * G + d];
                    }
                }
                SCOPED_TRACE(::testing::Message() << to_string(policy) << " on " << topo.to_string() << " layer " << l);
                EXPECT_EQ(counts[l].instance_load, inst);
                EXPECT_EQ(counts[l].flat.copies, flat);
                EXPECT_EQ(counts[l].flat_dedup.copies, dedup);
                EXPECT_EQ(counts[l].hsc.copies, hsc);
            }
        }
    }
}

TEST(Replay, RejectsMismatchedTraceAndPlan) {
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    RoutingTrace t = hand_trace();
    t.num_experts = 6;
    EXPECT_THROW(replay_trace(t, plan), Error);
    try {
        replay_trace(t, plan);
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidInput);
        EXPECT_NE(std::string(e.what()).find("5 experts"), std::string::npos) << e.what();
    }
    RoutingTrace t2 = hand_trace();
    t2.num_layers = 2;
    t2.expert_ids.resize(32, 0);
    EXPECT_THROW(replay_trace(t2, plan), Error);
    EXPECT_THROW(count_traffic(hand_trace(), plan, RoutingPolicy::kTar, CommScheme::kHsc, 1), Error);
}

// The replay checks every id as it routes it (the CLI turns TraceReader's separate check off): a bad id anywhere
// in a chunk is reported exactly as TraceReader reports it (first bad token in trace order, its first bad layer),
// for any thread count, instead of indexing the routing table out of bounds.
TEST(Replay, RejectsBadIdsLikeTheTraceReader) {
    Rng rng(3);
    const Topology topo{2, 2, std::nullopt};
    const ExpertPlan plan = random_plan(rng, 16, 3, 4, topo, RoutingPolicy::kTar);
    struct Case {
        int64_t token;
        int layer, pos;
        int32_t id;
        const char* message;
    };
    const Case cases[] = {
        {412, 2, 1, 16, "expert id 16 at token 1412, layer 2 is out of range [0, 16)"},
        {97, 1, 0, -1, "expert id -1 at token 1097, layer 1 is out of range [0, 16)"},
        {300, 0, 3, -7, "expert id -7 at token 1300, layer 0 is out of range [0, 16)"},
    };
    for (const Case& c : cases) {
        for (int threads : {1, 2}) {
            RoutingTrace chunk = random_trace(rng, 500, 3, 4, 16);
            chunk.expert_ids[(c.token * 3 + c.layer) * 4 + c.pos] = c.id;
            // A later token with a bad id on an earlier layer must not win.
            chunk.expert_ids[((c.token + 5) * 3 + 0) * 4 + 0] = 99;
            ReplayOptions opt;
            opt.num_threads = threads;
            Replayer r(plan, 2000, opt);
            r.consume(random_trace(rng, 1000, 3, 4, 16), 0);
            EXPECT_EQ(testing::error_of([&] { r.consume(chunk, 1000); }), c.message) << threads << " threads";
        }
    }
    // A repeated id in one token's top-k.
    RoutingTrace chunk = random_trace(rng, 50, 3, 4, 16);
    int32_t* row = &chunk.expert_ids[(20 * 3 + 1) * 4];
    row[3] = row[1];
    const std::string want = "expert id " + std::to_string(row[1]) + " is repeated in the top-k of token 20, layer 1";
    Replayer r(plan, 50);
    try {
        r.consume(chunk, 0);
        ADD_FAILURE() << "no error";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidInput);
        EXPECT_EQ(std::string(e.what()), want);
    }
    EXPECT_EQ(testing::error_of([&] { chunk.validate(); }), want);  // the trace's own check words it the same
    Replayer r2(plan, 50);
    EXPECT_EQ(testing::error_of([&] { r2.consume_layer(chunk, 0, 1); }), want);  // consume_layer_ids checks too
}

TEST(Replay, RejectsTraceWithAnotherTopK) {
    // The routers use the plan's k: a trace routed with another k is an error naming both values.
    const ExpertPlan plan = hand_plan(RoutingPolicy::kTar);
    RoutingTrace t;
    t.num_tokens = 2;
    t.num_layers = 1;
    t.top_k = 3;
    t.num_experts = 5;
    t.expert_ids = {0, 1, 2, 3, 4, 0};
    const std::string msg = testing::error_of([&] { replay_trace(t, plan); });
    EXPECT_NE(msg.find("the plan has top_k = 2 but the trace has top_k = 3"), std::string::npos) << msg;
}

TEST(CommScheme, ParsesNamesAndRejectsUnknown) {
    for (auto s : {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::k2dh, CommScheme::kHsc})
        EXPECT_EQ(parse_comm_scheme(to_string(s)), s);
    EXPECT_THROW(parse_comm_scheme("mesh"), Error);
}

TEST(Hardware, PresetsParseAndBadFilesAreRejected) {
    for (const auto& name : hardware_presets()) {
        HardwareModel hw = load_hardware(name);
        EXPECT_EQ(hw.name, name);
        EXPECT_GT(hw.cross_node_bandwidth, 0);
        // Round trip.
        HardwareModel back = parse_hardware(hardware_to_json(hw));
        EXPECT_DOUBLE_EQ(back.cross_node_bandwidth, hw.cross_node_bandwidth);
        EXPECT_DOUBLE_EQ(back.intra_node_latency, hw.intra_node_latency);
    }
    EXPECT_DOUBLE_EQ(load_hardware("a100-testbed").cross_node_bandwidth, 25e9 / 8);
    EXPECT_DOUBLE_EQ(load_hardware("a100-testbed").intra_node_bandwidth, 600e9);
    const std::string base = R"({"format": "grace.hardware/v1", "element_size": 2,
        "intra_node": {"bandwidth_GBps": 600, "latency_us": 5}, "compute": {"peak_tflops": 100, "n_half": 10},)";
    EXPECT_NO_THROW(parse_hardware(base + R"("cross_node": {"bandwidth_Gbps": 25, "latency_us": 30}})"));
    EXPECT_THROW(parse_hardware(base + R"("cross_node": {"bandwidth_Gbps": -25, "latency_us": 30}})"), Error);
    EXPECT_THROW(parse_hardware(base + R"("cross_node": {"bandwidth_Gbps": 0, "latency_us": 30}})"), Error);
    EXPECT_THROW(parse_hardware(base + R"("cross_node": {"latency_us": 30}})"), Error);
    EXPECT_THROW(parse_hardware(base + R"("cross_node": {"bandwidth_Gbps": 1, "bandwidth_GBps": 1, "latency_us": 3}})"),
                 Error);
    try {
        parse_hardware(base + R"("cross_node": {"bandwidth_Gbps": -25, "latency_us": 30}})");
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("cross_node bandwidth must be positive"), std::string::npos) << e.what();
    }
    EXPECT_THROW(load_hardware("no-such-preset"), Error);
}

TEST(Hardware, IntegerFieldsAreRangeCheckedNotCast) {
    // element_size 2^32 + 2 used to be cast to int (2; undefined behaviour for larger doubles), 2.5 to 2.
    const std::string link = R"("intra_node": {"bandwidth_GBps": 600, "latency_us": 5},
        "cross_node": {"bandwidth_Gbps": 25, "latency_us": 30}, "compute": {"peak_tflops": 100, "n_half": 10})";
    auto error_with = [&](const std::string& fields) {
        try {
            parse_hardware(R"({"format": "grace.hardware/v1", )" + fields + ", " + link + "}");
        } catch (const Error& e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_EQ(error_with(R"("element_size": 4294967298)"),
              "hardware: element_size: 4294967298 is outside [1, 2147483647]");
    EXPECT_EQ(error_with(R"("element_size": 2.5)"), "hardware: element_size: 2.5 is not an integer");
    EXPECT_EQ(error_with(R"("element_size": 2, "hidden": 1e300)"),
              "hardware: hidden: 1e+300 is outside [0, 2147483647]");
    EXPECT_EQ(error_with(R"("element_size": 2, "hidden": 2048)"), "");
}

TEST(Hardware, MeasuredH100PresetCarriesItsGemmTables) {
    // src/sim/presets/h100-measured.json: GEMM times from the H100 run (bench/results/gpu.md).
    const HardwareModel hw = load_hardware("h100-measured");
    ASSERT_EQ(hw.gemm_tables.count("olmoe"), 1u);
    ASSERT_EQ(hw.gemm_tables.count("qwen3-30b-a3b"), 1u);
    const ComputeModel olmoe(hw, "olmoe", 2048, 1024);
    EXPECT_EQ(olmoe.source(), "table:olmoe");
    // The table's own point at 16384 tokens: 302.17 us; and interpolation stays monotone in between.
    EXPECT_NEAR(olmoe.expert_seconds(16384), 3.0217e-4, 1e-9);
    EXPECT_GT(olmoe.expert_seconds(8192), olmoe.expert_seconds(4096));
}

TEST(Hardware, Sm90PresetCarriesItsGroupedGemmTables) {
    // src/sim/presets/h100-sm90.json: the sm90 grouped GEMM's per-expert share of a grouped launch
    // (bench/results/h100-gemm-table-sm90.json, column seconds_sm90_grouped).
    const HardwareModel hw = load_hardware("h100-sm90");
    const ComputeModel qwen(hw, "qwen3-30b-a3b", 2048, 768);
    EXPECT_EQ(qwen.source(), "table:qwen3-30b-a3b");
    EXPECT_NEAR(qwen.expert_seconds(16384), 2.8361e-4, 1e-9);  // the table's last point
    // Grouped, a small expert costs less than one cuBLAS call alone (h100-measured: ~10-11 us for <= 256 rows).
    EXPECT_LT(qwen.expert_seconds(32),
              ComputeModel(load_hardware("h100-measured"), "qwen3-30b-a3b", 2048, 768).expert_seconds(32));
}

TEST(Hardware, GemmTableInterpolation) {
    const std::string text = R"({"format": "grace.hardware/v1", "element_size": 2,
        "intra_node": {"bandwidth_GBps": 600, "latency_us": 5}, "cross_node": {"bandwidth_Gbps": 25, "latency_us": 30},
        "compute": {"peak_tflops": 100, "n_half": 10},
        "gemm_table": {"device": "X", "shapes": {"olmoe": {"hidden": 2048, "intermediate": 1024,
                        "tokens": [16, 64], "seconds": [1e-4, 2e-4]}}}})";
    HardwareModel hw = parse_hardware(text);
    ComputeModel table(hw, "olmoe", 2048, 1024);
    EXPECT_EQ(table.source(), "table:olmoe");
    EXPECT_EQ(table.expert_seconds(0), 0);
    EXPECT_DOUBLE_EQ(table.expert_seconds(8), 1e-4);
    EXPECT_DOUBLE_EQ(table.expert_seconds(40), 1.5e-4);
    EXPECT_DOUBLE_EQ(table.expert_seconds(112), 3e-4);
    // Matched by shape when the name differs; analytic otherwise.
    EXPECT_EQ(ComputeModel(hw, "other", 2048, 1024).source(), "table:olmoe");
    ComputeModel analytic(hw, "other", 1000, 1000);
    EXPECT_EQ(analytic.source(), "analytic");
    EXPECT_DOUBLE_EQ(analytic.expert_seconds(90), 6e6 * 100 / 1e14);
}

}  // namespace
}  // namespace grace
