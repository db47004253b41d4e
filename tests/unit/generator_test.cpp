// Synthetic trace generator (spec §10).
#include "grace/generator.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <numeric>

#include "grace/error.hpp"
#include "grace/stats.hpp"

namespace grace {
namespace {

GeneratorOptions opts(const std::string& preset, const std::string& dataset, int64_t T, uint64_t seed = 3) {
    GeneratorOptions o;
    o.preset = preset;
    o.dataset = dataset;
    o.num_tokens = T;
    o.seed = seed;
    return o;
}

TEST(Generator, PresetsHaveTheSpecShapes) {
    auto check = [](const std::string& name, int E, int k, int L, int H, int I) {
        const ModelPreset& p = find_preset(name);
        EXPECT_EQ(p.num_experts, E);
        EXPECT_EQ(p.top_k, k);
        EXPECT_EQ(p.num_layers, L);
        EXPECT_EQ(p.hidden, H);
        EXPECT_EQ(p.intermediate, I);
    };
    check("olmoe", 64, 8, 16, 2048, 1024);
    check("deepseek-v2-lite", 64, 6, 26, 2048, 1408);
    EXPECT_EQ(find_preset("deepseek-v2-lite").shared_experts, 2);
    check("qwen3-30b-a3b", 128, 8, 48, 2048, 768);
    check("mixtral", 8, 2, 32, 4096, 14336);
    check("gpt-oss-20b", 32, 4, 24, 2880, 2880);
    for (const char* d : {"wikitext", "arxiv", "github", "c4", "book", "mixed"})
        EXPECT_NE(std::find(generator_datasets().begin(), generator_datasets().end(), d), generator_datasets().end());
}

TEST(Generator, ValidTracesWithNormalizedDescendingWeights) {
    for (const auto& p : model_presets()) {
        GeneratorOptions o = opts(p.name, "mixed", 700);
        o.num_layers = 3;
        RoutingTrace t = generate_trace(o);
        EXPECT_EQ(t.num_tokens, 700);
        EXPECT_EQ(t.num_layers, 3);
        EXPECT_EQ(t.top_k, p.top_k);
        EXPECT_EQ(t.num_experts, p.num_experts);
        EXPECT_NO_THROW(t.validate());
        ASSERT_EQ(t.gate_weights.size(), t.expert_ids.size());
        for (int64_t r = 0; r < 700 * 3; ++r) {
            const float* w = t.gate_weights.data() + r * p.top_k;
            float sum = std::accumulate(w, w + p.top_k, 0.0f);
            EXPECT_NEAR(sum, 1.0f, 1e-5f);
            for (int j = 1; j < p.top_k; ++j) EXPECT_GE(w[j - 1], w[j]);
        }
    }
}

TEST(Generator, DeterministicForAnyThreadCountAndSeedSensitive) {
    GeneratorOptions o = opts("qwen3-30b-a3b", "arxiv", 3000);
    o.num_layers = 4;
    o.num_threads = 1;
    RoutingTrace a = generate_trace(o);
    o.num_threads = 2;
    RoutingTrace b = generate_trace(o);
    o.num_threads = 7;
    RoutingTrace c = generate_trace(o);
    EXPECT_EQ(a.expert_ids, b.expert_ids);
    EXPECT_EQ(a.expert_ids, c.expert_ids);
    EXPECT_EQ(a.gate_weights, c.gate_weights);
    o.seed = 4;
    EXPECT_NE(generate_trace(o).expert_ids, a.expert_ids);
    // A longer trace starts with the shorter one: tokens do not depend on how many follow.
    o.seed = 3;
    o.num_tokens = 1024;
    RoutingTrace head = generate_trace(o);
    EXPECT_TRUE(std::equal(head.expert_ids.begin(), head.expert_ids.end(), a.expert_ids.begin()));
}

TEST(Generator, OlmoeLoadsAreSkewedAndHotExpertsDependOnTheDataset) {
    ProfileOptions po;
    auto hottest = [&](const std::string& ds) {
        RoutingStats st = profile_trace(generate_trace(opts("olmoe", ds, 40000)), po);
        std::vector<int> hot;
        for (int l = 0; l < st.num_layers; ++l) {
            const int64_t* ld = st.layer_load(l);
            double mean = std::accumulate(ld, ld + 64, 0.0) / 64;
            double mx = static_cast<double>(*std::max_element(ld, ld + 64));
            EXPECT_GT(mx / mean, 2.0) << ds << " layer " << l;
            hot.push_back(static_cast<int>(std::max_element(ld, ld + 64) - ld));
        }
        return hot;
    };
    auto a = hottest("arxiv"), g = hottest("github");
    int same = 0;
    for (size_t l = 0; l < a.size(); ++l) same += a[l] == g[l];
    EXPECT_LT(same, static_cast<int>(a.size()) / 2);
}

// Per layer, how many of the n busiest experts of a are among the n busiest of b.
int hot_overlap(const RoutingStats& a, const RoutingStats& b, int l, int n) {
    auto top = [&](const RoutingStats& st) {
        std::vector<int> ids(st.num_experts);
        std::iota(ids.begin(), ids.end(), 0);
        const int64_t* ld = st.layer_load(l);
        std::stable_sort(ids.begin(), ids.end(), [&](int x, int y) { return ld[x] > ld[y]; });
        ids.resize(n);
        std::sort(ids.begin(), ids.end());
        return ids;
    };
    std::vector<int> ta = top(a), tb = top(b), both;
    std::set_intersection(ta.begin(), ta.end(), tb.begin(), tb.end(), std::back_inserter(both));
    return static_cast<int>(both.size());
}

// domain_shift 0: datasets of equal skew (wikitext and mixed) route alike, token for token; larger shifts move the
// hot experts further apart; the default is the preset's.
TEST(Generator, DomainShiftControlsHowFarHotExpertsDrift) {
    GeneratorOptions a = opts("gpt-oss-20b", "wikitext", 2000), b = opts("gpt-oss-20b", "mixed", 2000);
    a.domain_shift = b.domain_shift = 0.0;
    EXPECT_EQ(generate_trace(a).expert_ids, generate_trace(b).expert_ids);
    b.domain_shift = 0.3;
    EXPECT_NE(generate_trace(a).expert_ids, generate_trace(b).expert_ids);

    auto overlap = [](double shift) {
        GeneratorOptions x = opts("gpt-oss-20b", "wikitext", 20000), y = opts("gpt-oss-20b", "arxiv", 20000);
        x.domain_shift = y.domain_shift = shift;
        RoutingStats sx = profile_trace(generate_trace(x)), sy = profile_trace(generate_trace(y));
        int total = 0;
        for (int l = 0; l < sx.num_layers; ++l) total += hot_overlap(sx, sy, l, 3);
        return total;
    };
    const int near = overlap(0.1), mid = overlap(0.3), far = overlap(1.0);
    EXPECT_GT(near, mid);
    EXPECT_GT(mid, far);
    GeneratorOptions d = opts("gpt-oss-20b", "arxiv", 500), e = d;
    e.domain_shift = 0.2;  // the gpt-oss-20b preset's shift
    EXPECT_EQ(generate_trace(d).expert_ids, generate_trace(e).expert_ids);
}

TEST(Generator, MixtralLoadsAreFlat) {
    RoutingStats st = profile_trace(generate_trace(opts("mixtral", "c4", 50000)));
    for (int l = 0; l < st.num_layers; ++l) {
        const int64_t* ld = st.layer_load(l);
        double mean = std::accumulate(ld, ld + 8, 0.0) / 8;
        EXPECT_LT(static_cast<double>(*std::max_element(ld, ld + 8)) / mean, 1.45) << "layer " << l;
    }
}

TEST(Generator, RejectsBadOptions) {
    EXPECT_THROW(generate_trace(opts("gpt-5", "c4", 10)), Error);
    EXPECT_THROW(generate_trace(opts("olmoe", "imagenet", 10)), Error);
    EXPECT_THROW(generate_trace(opts("olmoe", "c4", 0)), Error);
    GeneratorOptions o = opts("olmoe", "c4", 10);
    o.sequence_length = 0;
    EXPECT_THROW(generate_trace(o), Error);
    o = opts("olmoe", "c4", 10);
    for (double bad : {1.5, std::nan("")}) {
        o.domain_shift = bad;
        try {
            generate_trace(o);
            ADD_FAILURE() << "domain shift " << bad << " accepted";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("domain shift must be in [0, 1]"), std::string::npos) << e.what();
        }
    }
    try {
        find_preset("nope");
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("qwen3-30b-a3b"), std::string::npos);
    }
}

}  // namespace
}  // namespace grace
