// Profiler (spec §2), statistics folders and aggregated imports.
#include "grace/stats.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>

#include "grace/error.hpp"
#include "grace/generator.hpp"
#include "grace/npy.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

RoutingTrace make_trace(int64_t T, int L, int k, int E, std::vector<int32_t> ids) {
    RoutingTrace t;
    t.num_tokens = T;
    t.num_layers = L;
    t.top_k = k;
    t.num_experts = E;
    t.expert_ids = std::move(ids);
    return t;
}

RoutingTrace small_generated(int64_t T = 3000) {
    GeneratorOptions o;
    o.preset = "olmoe";
    o.dataset = "github";
    o.num_tokens = T;
    o.num_layers = 3;
    o.seed = 7;
    return generate_trace(o);
}

void expect_same(const RoutingStats& a, const RoutingStats& b) {
    EXPECT_EQ(a.num_layers, b.num_layers);
    EXPECT_EQ(a.num_experts, b.num_experts);
    EXPECT_EQ(a.top_k, b.top_k);
    EXPECT_EQ(a.num_tokens, b.num_tokens);
    EXPECT_EQ(a.affinity, b.affinity);
    EXPECT_EQ(a.load, b.load);
    EXPECT_EQ(a.num_gpus, b.num_gpus);
    EXPECT_EQ(a.source_load, b.source_load);
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "<no error>";
}

// 4 tokens, one layer, k = 3, E = 5, ids in router order (unsorted on purpose):
//   t0 {2,0,1}  t1 {1,2,4}  t2 {3,1,0}  t3 {4,2,1}
// pairs: t0 01 02 12; t1 12 14 24; t2 01 03 13; t3 12 14 24
// A01=2 A02=1 A03=1 A12=3 A13=1 A14=2 A24=2, others 0; loads 2,4,3,1,2; homes on 2 GPUs: t0,t1 -> 0, t2,t3 -> 1.
TEST(Profile, HandWorkedFourTokens) {
    RoutingTrace t = make_trace(4, 1, 3, 5, {2, 0, 1, 1, 2, 4, 3, 1, 0, 4, 2, 1});
    ProfileOptions o;
    o.topology = Topology::parse("1x2");
    RoutingStats st = profile_trace(t, o);
    const int64_t A[5][5] = {{0, 2, 1, 1, 0}, {2, 0, 3, 1, 2}, {1, 3, 0, 0, 2}, {1, 1, 0, 0, 0}, {0, 2, 2, 0, 0}};
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < 5; ++j) EXPECT_EQ(st.affinity_at(0, i, j), A[i][j]) << i << "," << j;
    EXPECT_EQ(st.load, (std::vector<int64_t>{2, 4, 3, 1, 2}));
    EXPECT_EQ(st.num_tokens, 4);
    EXPECT_EQ(st.num_gpus, 2);
    EXPECT_EQ(st.source_load, (std::vector<int64_t>{1, 2, 2, 0, 1, 1, 2, 1, 1, 1}));
    EXPECT_NO_THROW(st.validate());
}

TEST(Profile, TopOneCountsLoadsWithoutPairs) {
    RoutingStats st = profile_trace(make_trace(3, 2, 1, 3, {0, 2, 0, 1, 2, 1}));
    EXPECT_EQ(st.load, (std::vector<int64_t>{2, 0, 1, 0, 2, 1}));
    for (int64_t a : st.affinity) EXPECT_EQ(a, 0);
}

TEST(Profile, ThreadCountDoesNotChangeResults) {
    RoutingTrace t = small_generated();
    ProfileOptions o;
    o.topology = Topology::parse("2x2");
    o.num_threads = 1;
    RoutingStats one = profile_trace(t, o);
    for (int threads : {2, 3, 5, 8}) {
        o.num_threads = threads;
        expect_same(one, profile_trace(t, o));
    }
    // Loads sum to T*k per layer and rows of A to (k-1) * load.
    for (int l = 0; l < one.num_layers; ++l) {
        int64_t total = 0;
        for (int i = 0; i < one.num_experts; ++i) {
            total += one.load_at(l, i);
            int64_t row = 0;
            for (int j = 0; j < one.num_experts; ++j) row += one.affinity_at(l, i, j);
            EXPECT_EQ(row, (one.top_k - 1) * one.load_at(l, i));
        }
        EXPECT_EQ(total, one.num_tokens * one.top_k);
    }
}

TEST(Profile, MoreThan65535TokensPerThreadFlushWithoutOverflow) {
    // One expert pair in every token: a uint16 cell would wrap without the periodic flush.
    const int64_t T = 200000;
    std::vector<int32_t> ids;
    for (int64_t t = 0; t < T; ++t) {
        ids.push_back(0);
        ids.push_back(1);
    }
    ProfileOptions o;
    o.num_threads = 1;
    RoutingStats st = profile_trace(make_trace(T, 1, 2, 2, ids), o);
    EXPECT_EQ(st.affinity_at(0, 0, 1), T);
    EXPECT_EQ(st.load_at(0, 1), T);
}

TEST(Profile, StreamingEqualsInMemory) {
    testing::TempDir dir;
    RoutingTrace t = small_generated(5000);
    save_trace(t, dir.file("t.npy"));
    ProfileOptions o;
    o.topology = Topology::parse("2x4");
    RoutingStats mem = profile_trace(t, o);
    for (int64_t chunk : {int64_t{1} << 16, int64_t{999}, int64_t{7}}) {
        o.chunk_tokens = chunk;
        RoutingStats file = profile_trace_file(dir.file("t.npy"), {}, o);
        expect_same(mem, file);
        EXPECT_EQ(file.model, "olmoe");
        EXPECT_EQ(file.dataset, "github");
    }
}

TEST(Profile, RejectsBadInputs) {
    // k > E
    EXPECT_NE(error_of([] { profile_trace(make_trace(1, 1, 3, 2, {0, 1, 0})); }).find("top_k"), std::string::npos);
    // negative id, id out of range, repeated id: the message names the token and layer.
    std::string neg = error_of([] { profile_trace(make_trace(2, 1, 2, 4, {0, 1, -1, 2})); });
    EXPECT_NE(neg.find("-1"), std::string::npos) << neg;
    EXPECT_NE(neg.find("token 1"), std::string::npos) << neg;
    std::string big = error_of([] { profile_trace(make_trace(2, 2, 2, 4, {0, 1, 2, 3, 0, 1, 2, 4})); });
    EXPECT_NE(big.find("out of range"), std::string::npos) << big;
    EXPECT_NE(big.find("token 1, layer 1"), std::string::npos) << big;
    std::string rep = error_of([] { profile_trace(make_trace(2, 1, 3, 4, {0, 1, 2, 3, 3, 1})); });
    EXPECT_NE(rep.find("repeated"), std::string::npos) << rep;
    // The first violation in token order is reported whatever the thread count.
    std::vector<int32_t> ids(2 * 40000);  // large enough for the parallel path
    for (int64_t t = 0; t < 40000; ++t) {
        ids[2 * t] = 0;
        ids[2 * t + 1] = 1;
    }
    ids[2 * 7000 + 1] = 0;
    ids[2 * 9000] = 9;
    ids[2 * 30000] = 9;
    ProfileOptions o;
    o.num_threads = 4;
    std::string first = error_of([&] { profile_trace(make_trace(40000, 1, 2, 3, ids), o); });
    EXPECT_NE(first.find("token 7000"), std::string::npos) << first;
    // NaN weights, empty trace, shape mismatch, bad options.
    RoutingTrace w = make_trace(1, 1, 2, 4, {0, 1});
    w.gate_weights = {0.5f, std::numeric_limits<float>::quiet_NaN()};
    EXPECT_NE(error_of([&] { profile_trace(w); }).find("non-finite"), std::string::npos);
    EXPECT_NE(error_of([] { profile_trace(make_trace(0, 1, 2, 4, {})); }).find("empty"), std::string::npos);
    EXPECT_THROW(profile_trace(make_trace(2, 1, 2, 4, {0, 1})), Error);
    ProfileOptions bad;
    bad.num_threads = -1;
    EXPECT_THROW(profile_trace(make_trace(1, 1, 2, 4, {0, 1}), bad), Error);
}

TEST(Profile, FileWithBadIdFails) {
    testing::TempDir dir;
    write_npy(dir.file("t.npy"), std::vector<int32_t>{0, 1, 1, 1}, {2, 2});
    TraceOverrides ov;
    ov.num_experts = 4;
    EXPECT_THROW(profile_trace_file(dir.file("t.npy"), ov), Error);
}

TEST(Stats, SaveLoadRoundTripAndMissingFolder) {
    testing::TempDir dir;
    ProfileOptions o;
    o.topology = Topology::parse("1x4");
    RoutingStats st = profile_trace(small_generated(500), o);
    save_stats(st, dir.file("s"));
    RoutingStats back = load_stats(dir.file("s"));
    expect_same(st, back);
    EXPECT_EQ(back.model, "olmoe");
    // Overwriting works; a missing parent fails with kIo and leaves nothing behind.
    save_stats(st, dir.file("s"));
    try {
        save_stats(st, dir.file("missing/s"));
        FAIL() << "no error";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kIo);
    }
    EXPECT_FALSE(std::filesystem::exists(dir.file("missing")));
    // A corrupted folder is rejected, naming the problem.
    write_npy(dir.file("s/load.npy"), std::vector<int64_t>{1, 2, 3}, {3});
    EXPECT_NE(error_of([&] { load_stats(dir.file("s")); }).find("load.npy"), std::string::npos);
}

// Sets an environment variable for one scope.
class ScopedEnv {
  public:
    ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
    ~ScopedEnv() { unsetenv(name_); }

  private:
    const char* name_;
};

TEST(ProfileLimits, MemoryIsEstimatedBeforeAllocating) {
    testing::TempDir dir;
    // 48 layers, k = 2, ids 0..1: --experts 100000 asks for 48 * 10^10 affinity cells (8 bytes) plus the counting
    // tables (10 bytes per cell for one token group): 8.64e12 bytes = 7.9 TiB. It used to grow past 5.7 GB.
    std::vector<int32_t> ids;
    for (int l = 0; l < 48; ++l) ids.insert(ids.end(), {0, 1});
    write_npy(dir.file("t.npy"), ids, {1, 48, 2});
    TraceOverrides ov;
    ov.num_experts = 100000;
    ProfileOptions o;
    o.num_threads = 1;
    {
        ScopedEnv env("GRACE_MEMORY_LIMIT", "16G");
        EXPECT_EQ(error_of([&] { profile_trace_file(dir.file("t.npy"), ov, o); }),
                  "profile: the affinity of 100000 experts (--experts) over 48 layers, with its counting tables, needs "
                  "7.9 TiB (limit: 16.0 GiB, GRACE_MEMORY_LIMIT)");
        EXPECT_NE(error_of([&] { profile_trace(make_trace(1, 48, 2, 100000, ids), o); }).find("needs 7.9 TiB"),
                  std::string::npos);
        ov.num_experts = 2;
        EXPECT_EQ(profile_trace_file(dir.file("t.npy"), ov, o).num_experts, 2);
    }
    {
        ScopedEnv env("GRACE_MEMORY_LIMIT", "lots");
        EXPECT_EQ(error_of([&] { profile_trace_file(dir.file("t.npy"), ov, o); }),
                  "GRACE_MEMORY_LIMIT='lots' is not a size (e.g. 16G or 17179869184)");
    }
}

TEST(StatsLimits, MetaIntegersAreRangeChecked) {
    testing::TempDir dir;
    save_stats(profile_trace(make_trace(1, 1, 2, 3, {0, 1})), dir.file("s"));
    const std::string meta = dir.file("s/meta.json");
    auto error_with = [&](const std::string& json) {
        testing::write_bytes(meta, json);
        return error_of([&] { load_stats(dir.file("s")); });
    };
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 1, "num_experts": 4294967299})"),
              meta + ": num_experts: 4294967299 is outside [1, 2147483647]");
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 1.5, "num_experts": 3})"),
              meta + ": num_layers: 1.5 is not an integer");
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 1, "num_experts": 3, "top_k": 4})"),
              meta + ": top_k: 4 is outside [0, 3]");
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 1, "num_experts": 3, "num_gpus": -1})"),
              meta + ": num_gpus: -1 is outside [0, 65536]");
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_experts": 3})"), meta + ": missing field num_layers");
    // L x E x E must be representable before it is compared with the arrays' shapes.
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 2147483647, "num_experts": 2147483647})"),
              meta + ": L x E x E: 2147483647 x 2147483647 x 2147483647 overflows a 64-bit size");
    EXPECT_EQ(error_with(R"({"format": "grace.stats/v1", "num_layers": 1, "num_experts": 3, "top_k": 2})"),
              "<no error>");
}

TEST(Stats, ValidateCatchesAsymmetryAndNegatives) {
    RoutingStats st = profile_trace(make_trace(1, 1, 2, 3, {0, 1}));
    EXPECT_NO_THROW(st.validate());
    RoutingStats bad = st;
    bad.affinity[1] = 5;
    EXPECT_NE(error_of([&] { bad.validate(); }).find("symmetric"), std::string::npos);
    bad = st;
    bad.affinity[0] = 1;
    EXPECT_NE(error_of([&] { bad.validate(); }).find("diagonal"), std::string::npos);
    bad = st;
    bad.load[2] = -1;
    EXPECT_NE(error_of([&] { bad.validate(); }).find("negative"), std::string::npos);
}

TEST(Stats, FromAggregatesHalvesOrderedPairsAndDerivesLoads) {
    // Token sets {0,1}, {0,1}, {1,2} (k = 2): A01 = 2, A12 = 1; ordered-pair counts double each entry.
    std::vector<double> twice = {0, 4, 0, 4, 0, 2, 0, 2, 0};
    RoutingStats st = stats_from_aggregates(twice, {3, 3}, {}, {}, true, 2);
    EXPECT_EQ(st.affinity, (std::vector<int64_t>{0, 2, 0, 2, 0, 1, 0, 1, 0}));
    EXPECT_EQ(st.load, (std::vector<int64_t>{2, 3, 1}));
    EXPECT_EQ(st.num_tokens, 3);
    // Without halving, with loads given, and with C2R's diagonal marker ignored.
    std::vector<double> once = {-1, 2, 0, 2, -1, 1, 0, 1, -1};
    RoutingStats st2 = stats_from_aggregates(once, {1, 3, 3}, {2, 3, 1}, {1, 3}, false, 2);
    EXPECT_EQ(st2.affinity, st.affinity);
    EXPECT_EQ(st2.load, st.load);
    // Odd ordered-pair entry, asymmetry, negatives, fractions, shapes, derived loads that do not divide.
    EXPECT_NE(error_of([] {
                  stats_from_aggregates({0, 3, 3, 0}, {2, 2}, {}, {}, true, 2);
              }).find("odd"),
              std::string::npos);
    EXPECT_NE(error_of([] {
                  stats_from_aggregates({0, 3, 2, 0}, {2, 2}, {}, {}, false, 2);
              }).find("symmetric"),
              std::string::npos);
    EXPECT_THROW(stats_from_aggregates({0, -2, -2, 0}, {2, 2}, {}, {}, false, 2), Error);
    EXPECT_THROW(stats_from_aggregates({0, 1.5, 1.5, 0}, {2, 2}, {}, {}, false, 2), Error);
    EXPECT_THROW(stats_from_aggregates({0, 1, 1, 0, 0, 0}, {2, 3}, {}, {}, false, 2), Error);
    EXPECT_THROW(stats_from_aggregates({0, 1, 1, 0}, {2, 2}, {1, 1, 1}, {3}, false, 2), Error);
    EXPECT_THROW(stats_from_aggregates({0, 1, 1, 0}, {2, 2}, {}, {}, false, 1), Error);
    EXPECT_THROW(stats_from_aggregates({0, 1, 0, 1, 0, 0, 0, 0, 0}, {3, 3}, {}, {}, false, 3), Error);
}

// ---- mixed profiles (grace profile A B --mix) and robust loads (grace plan --robust) ---------------------------

// Two tiny traces, one layer, E = 3, k = 2:
//   A (4 tokens): {0,1} {0,1} {0,2} {1,2}  -> load 3,3,2; A01 = 2, A02 = 1, A12 = 1
//   B (2 tokens): {1,2} {0,2}              -> load 1,1,2; A01 = 0, A02 = 1, A12 = 1
RoutingTrace tiny_a() { return make_trace(4, 1, 2, 3, {0, 1, 0, 1, 0, 2, 1, 2}); }
RoutingTrace tiny_b() { return make_trace(2, 1, 2, 3, {1, 2, 0, 2}); }

TEST(MixStats, TokenWeightedMergeIsTheConcatenation) {
    RoutingStats m = merge_stats({profile_trace(tiny_a()), profile_trace(tiny_b())}, {"a.npy", "b.npy"});
    EXPECT_EQ(m.num_tokens, 6);
    EXPECT_EQ(m.load, (std::vector<int64_t>{4, 4, 4}));
    EXPECT_EQ(m.affinity_at(0, 0, 1), 2);
    EXPECT_EQ(m.affinity_at(0, 0, 2), 2);
    EXPECT_EQ(m.affinity_at(0, 1, 2), 2);
    ASSERT_EQ(m.sources.size(), 2u);
    EXPECT_EQ(m.sources[0].trace, "a.npy");
    EXPECT_EQ(m.sources[0].weight, 4);  // token count
    EXPECT_EQ(m.sources[1].scale, 1);
    // The concatenated trace gives the same counts.
    RoutingTrace ab = make_trace(6, 1, 2, 3, {0, 1, 0, 1, 0, 2, 1, 2, 1, 2, 0, 2});
    RoutingStats c = profile_trace(ab);
    EXPECT_EQ(m.load, c.load);
    EXPECT_EQ(m.affinity, c.affinity);
}

// --mix 1,2: A gets 1/3 of the 6-token mix (scale 1/3 * 6/4 = 0.5), B 2/3 (scale 2/3 * 6/2 = 2).
//   load = 0.5*(3,3,2) + 2*(1,1,2) = (3.5, 3.5, 5) -> (4, 4, 5), halves rounded away from zero
//   A01 = 0.5*2 + 0 = 1;  A02 = 0.5*1 + 2*1 = 2.5 -> 3;  A12 = 0.5*1 + 2*1 = 2.5 -> 3
TEST(MixStats, ExplicitWeightsRescaleEachTraceToItsShare) {
    ProfileOptions o;
    o.topology = Topology::parse("1x2");
    RoutingStats m = merge_stats({profile_trace(tiny_a(), o), profile_trace(tiny_b(), o)}, {"a", "b"}, {1, 2});
    EXPECT_EQ(m.num_tokens, 6);
    EXPECT_EQ(m.load, (std::vector<int64_t>{4, 4, 5}));
    EXPECT_EQ(m.affinity_at(0, 0, 1), 1);
    EXPECT_EQ(m.affinity_at(0, 0, 2), 3);
    EXPECT_EQ(m.affinity_at(0, 1, 2), 3);
    EXPECT_EQ(m.affinity_at(0, 2, 1), 3);
    EXPECT_DOUBLE_EQ(m.sources[0].scale, 0.5);
    EXPECT_DOUBLE_EQ(m.sources[1].scale, 2.0);
    EXPECT_EQ(m.sources[1].weight, 2);
    // Source loads per trace (homes floor(t*2/T_d)): A GPU0 {0,1}{0,1} = (2,2,0), GPU1 {0,2}{1,2} = (1,1,2);
    // B GPU0 {1,2} = (0,1,1), GPU1 {0,2} = (1,0,1). Mixed: GPU0 0.5*(2,2,0) + 2*(0,1,1) = (1,3,2),
    // GPU1 0.5*(1,1,2) + 2*(1,0,1) = (2.5,0.5,3) -> (3,1,3).
    EXPECT_EQ(m.source_load, (std::vector<int64_t>{1, 3, 2, 3, 1, 3}));
    // Equal shares for traces of equal length are the plain sum.
    RoutingStats same = merge_stats({profile_trace(tiny_a()), profile_trace(tiny_a())}, {"a", "a2"}, {5, 5});
    EXPECT_EQ(same.load, (std::vector<int64_t>{6, 6, 4}));
    // Weights whose sum is not finite: the shares of {1, 1} still (they once summed to inf and gave all-zero counts).
    const RoutingStats a = profile_trace(tiny_a(), o), b = profile_trace(tiny_b(), o);
    const RoutingStats even = merge_stats({a, b}, {"a", "b"}, {1, 1});
    const RoutingStats huge = merge_stats({a, b}, {"a", "b"}, {1e308, 1e308});
    EXPECT_GT(even.load[0], 0);
    EXPECT_EQ(huge.load, even.load);
    EXPECT_EQ(huge.affinity, even.affinity);
    EXPECT_DOUBLE_EQ(huge.sources[0].scale, even.sources[0].scale);
}

TEST(MixStats, RejectsUnlikeTracesAndBadWeights) {
    const RoutingStats a = profile_trace(tiny_a());
    const RoutingStats e4 = profile_trace(make_trace(1, 1, 2, 4, {0, 3}));
    const RoutingStats k1 = profile_trace(make_trace(1, 1, 1, 3, {0}));
    EXPECT_NE(error_of([&] {
                  merge_stats({a, e4}, {"a.npy", "e4.npy"});
              }).find("e4.npy has E=4 but a.npy has E=3"),
              std::string::npos);
    EXPECT_NE(error_of([&] { merge_stats({a, k1}, {"a.npy", "k1.npy"}); }).find("k1.npy has k=1"), std::string::npos);
    EXPECT_NE(error_of([&] {
                  merge_stats({a, a}, {"a", "b"}, {1});
              }).find("1 weights for 2 traces"),
              std::string::npos);
    EXPECT_NE(error_of([&] {
                  merge_stats({a, a}, {"a", "b"}, {1, 0});
              }).find("weight 2 (for b) is 0"),
              std::string::npos);
    EXPECT_NE(error_of([&] { merge_stats({a}, {"a"}, {std::nan("")}); }).find("finite"), std::string::npos);
    EXPECT_NE(error_of([] { merge_stats({}, {}); }).find("at least one trace"), std::string::npos);
}

// A with windows of 3 tokens: w0 = tokens 0-2 {0,1}{0,1}{0,2} -> (3,2,1); w1 = token 3 {1,2} -> (0,1,1).
TEST(RobustLoads, HandWorkedQuantilesOverWindows) {
    ProfileOptions o;
    o.window_tokens = 3;
    RoutingStats a = profile_trace(tiny_a(), o);
    EXPECT_EQ(a.window_counts, (std::vector<int64_t>{3, 1}));
    EXPECT_EQ(a.window_load, (std::vector<int64_t>{3, 2, 1, 0, 1, 1}));
    // Rates (weight = window tokens): e0 1 (3), 0 (1); e1 2/3 (3), 1 (1); e2 1/3 (3), 1 (1). Total weight 4.
    // q = 0.75 (3 of 4): e0 1, e1 2/3, e2 1/3; sum 2, layer load 8 -> (4, 8/3, 4/3).
    std::vector<double> r = robust_loads(a, 0.75);
    EXPECT_DOUBLE_EQ(r[0], 4.0);
    EXPECT_DOUBLE_EQ(r[1], 8.0 / 3);
    EXPECT_DOUBLE_EQ(r[2], 4.0 / 3);
    // q = 0.25: e0 0, e1 2/3, e2 1/3 -> (0, 16/3, 8/3). q = 1 is the maximum rate: 1 each -> 8/3 each.
    r = robust_loads(a, 0.25);
    EXPECT_DOUBLE_EQ(r[0], 0.0);
    EXPECT_DOUBLE_EQ(r[1], 16.0 / 3);
    EXPECT_DOUBLE_EQ(r[2], 8.0 / 3);
    for (double v : robust_loads(a, 1.0)) EXPECT_DOUBLE_EQ(v, 8.0 / 3);

    // Mixed with B (one window of 2 tokens, (1,1,2)) at --mix 1,2: window weights 0.5*3, 0.5*1, 2*2 = 1.5, 0.5, 4.
    // q = 0.9 (5.4 of 6): e0 rates 0 (0.5), 1/2 (4), 1 (1.5) -> 1; e1 1/2 (4), 2/3 (1.5), 1 (0.5) -> 2/3;
    // e2 1/3 (1.5), 1 (0.5), 1 (4) -> 1. Sum 8/3, mixed layer load 4+4+5 = 13 -> (4.875, 3.25, 4.875).
    RoutingStats m = merge_stats({a, profile_trace(tiny_b(), o)}, {"a", "b"}, {1, 2});
    EXPECT_EQ(m.window_counts, (std::vector<int64_t>{3, 1, 2}));
    EXPECT_EQ(m.window_weight, (std::vector<double>{0.5, 0.5, 2.0}));
    EXPECT_EQ(m.window_load, (std::vector<int64_t>{3, 2, 1, 0, 1, 1, 1, 1, 2}));
    r = robust_loads(m, 0.9);
    EXPECT_DOUBLE_EQ(r[0], 4.875);
    EXPECT_DOUBLE_EQ(r[1], 3.25);
    EXPECT_DOUBLE_EQ(r[2], 4.875);
}

TEST(RobustLoads, NeedWindowsAndAQuantileInRange) {
    RoutingStats plain = profile_trace(tiny_a());
    EXPECT_NE(error_of([&] { robust_loads(plain, 0.9); }).find("re-profile with `grace profile ... --window-tokens"),
              std::string::npos);
    ProfileOptions o;
    o.window_tokens = 2;
    RoutingStats w = profile_trace(tiny_a(), o);
    // A window larger than the trace is one window of the whole trace (no overflow near INT64_MAX).
    ProfileOptions huge;
    huge.window_tokens = std::numeric_limits<int64_t>::max();
    EXPECT_EQ(profile_trace(tiny_a(), huge).window_counts, (std::vector<int64_t>{4}));
    for (double q : {0.0, -0.5, 1.5, std::nan("")})
        EXPECT_NE(error_of([&] { robust_loads(w, q); }).find("outside (0, 1]"), std::string::npos) << q;
}

TEST(RobustLoads, WindowsSurviveSaveLoadAndThreadCounts) {
    testing::TempDir dir;
    RoutingTrace t = small_generated(2000);
    save_trace(t, dir.file("t.npy"));
    ProfileOptions o;
    o.window_tokens = 300;
    o.num_threads = 1;
    o.chunk_tokens = 128;  // windows straddle chunks
    RoutingStats one = profile_trace_file(dir.file("t.npy"), {}, o);
    EXPECT_EQ(one.num_windows(), 7);  // 6 x 300 + 200
    EXPECT_EQ(one.window_counts.back(), 200);
    o.num_threads = 2;
    RoutingStats two = profile_trace_file(dir.file("t.npy"), {}, o);
    EXPECT_EQ(one.window_load, two.window_load);
    EXPECT_EQ(one.window_load, profile_trace(t, o).window_load);
    // Window loads sum to the loads.
    for (int l = 0; l < one.num_layers; ++l)
        for (int e = 0; e < one.num_experts; ++e) {
            int64_t sum = 0;
            for (int w = 0; w < one.num_windows(); ++w)
                sum += one.window_load[(static_cast<size_t>(l) * one.num_windows() + w) * one.num_experts + e];
            EXPECT_EQ(sum, one.load_at(l, e));
        }
    RoutingStats mixed = merge_stats({one, two}, {"x.npy", "y.npy"}, {1, 3});
    save_stats(mixed, dir.file("s"));
    RoutingStats back = load_stats(dir.file("s"));
    expect_same(mixed, back);
    EXPECT_EQ(back.window_tokens, 300);
    EXPECT_EQ(back.window_load, mixed.window_load);
    EXPECT_EQ(back.window_counts, mixed.window_counts);
    EXPECT_EQ(back.window_weight, mixed.window_weight);
    ASSERT_EQ(back.sources.size(), 2u);
    EXPECT_EQ(back.sources[1].trace, "y.npy");
    EXPECT_DOUBLE_EQ(back.sources[1].weight, 3);
    EXPECT_EQ(robust_loads(back, 0.9), robust_loads(mixed, 0.9));
    // A window file that disagrees with meta.json is rejected, naming it.
    write_npy(dir.file("s/window_weight.npy"), std::vector<double>{1.0}, {1});
    EXPECT_NE(error_of([&] { load_stats(dir.file("s")); }).find("window_weight.npy"), std::string::npos);
}

}  // namespace
}  // namespace grace
