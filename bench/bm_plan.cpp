// make_plan at real model shapes: the full GRACE method (hierarchical+dynamic+tar) on Qwen3-30B-A3B (48 x 128,
// 2x4) and DeepSeek-V3 (58 x 256, 4x8), and EPLB (eplb-hierarchical+eplb) at DeepSeek-V3 scale (4x8, 9 slots
// per GPU = 288 physical experts, DeepSeek's 32 redundant experts). Threads = the first argument.
//
// Statistics are synthetic but structured like real routing: Zipf-frequent latent topics each favour a block of
// experts, expert popularity is log-normal-skewed, and tokens draw k experts without replacement by Gumbel
// top-k, so affinity is clustered and loads are skewed (T = 8192 tokens per layer).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <numeric>

#include "core/rng.hpp"
#include "grace/planner.hpp"
#include "grace/stats.hpp"

namespace grace {
namespace {

RoutingStats synthetic_stats(int L, int E, int k, int T, uint64_t seed) {
    RoutingStats st;
    st.num_layers = L;
    st.num_experts = E;
    st.top_k = k;
    st.num_tokens = T;
    st.model = "synthetic";
    st.affinity.assign(static_cast<size_t>(L) * E * E, 0);
    st.load.assign(static_cast<size_t>(L) * E, 0);
    const int topics = 16;
    Rng rng(seed);
    std::vector<double> topic_cdf(topics);
    double z = 0;
    for (int i = 0; i < topics; ++i) topic_cdf[i] = (z += 1.0 / (i + 1));
    for (double& c : topic_cdf) c /= z;
    std::vector<double> logw(static_cast<size_t>(topics) * E), key(E);
    std::vector<int> idx(E);
    for (int l = 0; l < L; ++l) {
        std::vector<int> perm(E);
        std::iota(perm.begin(), perm.end(), 0);
        for (int e = E - 1; e > 0; --e) std::swap(perm[e], perm[rng.below(e + 1)]);
        for (int e = 0; e < E; ++e) {
            const double pop =
                1.2 * std::sqrt(-2 * std::log(1 - rng.uniform())) * std::cos(6.283185307 * rng.uniform());
            for (int t = 0; t < topics; ++t)
                logw[static_cast<size_t>(t) * E + e] = pop + ((perm[e] * topics / E) == t ? 2.5 : 0.0);
        }
        int64_t* load = st.load.data() + static_cast<size_t>(l) * E;
        int64_t* aff = st.affinity.data() + static_cast<size_t>(l) * E * E;
        for (int tok = 0; tok < T; ++tok) {
            const double u = rng.uniform();
            const int topic =
                static_cast<int>(std::lower_bound(topic_cdf.begin(), topic_cdf.end(), u) - topic_cdf.begin());
            const double* w = logw.data() + static_cast<size_t>(std::min(topic, topics - 1)) * E;
            for (int e = 0; e < E; ++e) key[e] = w[e] - std::log(-std::log(std::max(rng.uniform(), 1e-300)));
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) { return key[a] > key[b]; });
            for (int i = 0; i < k; ++i) {
                ++load[idx[i]];
                for (int j = 0; j < k; ++j)
                    if (i != j) ++aff[static_cast<size_t>(idx[i]) * E + idx[j]];
            }
        }
    }
    return st;
}

const RoutingStats& stats_for(int L, int E, int k) {
    static std::map<std::tuple<int, int, int>, RoutingStats> cache;
    auto key = std::make_tuple(L, E, k);
    auto it = cache.find(key);
    if (it == cache.end()) {
        it = cache.emplace(key, synthetic_stats(L, E, k, 8192, 7)).first;
    }
    return it->second;
}

void run(benchmark::State& state, int L, int E, int k, Topology topo, const char* method) {
    const RoutingStats& st = stats_for(L, E, k);
    PlanOptions opt;
    opt.method = method;
    opt.num_threads = static_cast<int>(state.range(0));
    for (auto _ : state) {
        ExpertPlan plan = make_plan(st, topo, opt);
        benchmark::DoNotOptimize(plan.layers.data());
    }
    state.counters["layers"] = st.num_layers;
    state.counters["experts"] = st.num_experts;
}

void BM_PlanGraceQwen3(benchmark::State& state) { run(state, 48, 128, 8, Topology{2, 4, std::nullopt}, "grace"); }
void BM_PlanGraceDeepSeekV3(benchmark::State& state) { run(state, 58, 256, 8, Topology{4, 8, std::nullopt}, "grace"); }
void BM_PlanEplbDeepSeekV3(benchmark::State& state) { run(state, 58, 256, 8, Topology{4, 8, 9}, "eplb"); }
// Attribution: grouping alone (no replication, routing tables still built) and the vanilla floor (stats
// validation, replication and routing tables, plan validation: everything but grouping).
void BM_PlanHgOnlyDeepSeekV3(benchmark::State& state) {
    run(state, 58, 256, 8, Topology{4, 8, std::nullopt}, "hierarchical+none+primary");
}
void BM_PlanVanillaDrDeepSeekV3(benchmark::State& state) {
    run(state, 58, 256, 8, Topology{4, 8, std::nullopt}, "vanilla+dynamic+tar");
}

// Plan time against the number of experts (the E = 64 ... 1024 table of bench/results/plan.md): the grace method
// on 8 layers of E experts, top-8, topology 4x8, one thread.
void BM_PlanGraceExperts(benchmark::State& state) {
    run(state, 8, static_cast<int>(state.range(1)), 8, Topology{4, 8, std::nullopt}, "grace");
}

BENCHMARK(BM_PlanGraceQwen3)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_PlanGraceDeepSeekV3)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_PlanEplbDeepSeekV3)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_PlanGraceExperts)
    ->ArgsProduct({{1}, {64, 128, 256, 512, 1024}})
    ->ArgNames({"threads", "E"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_PlanHgOnlyDeepSeekV3)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_PlanVanillaDrDeepSeekV3)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);

}  // namespace
}  // namespace grace

BENCHMARK_MAIN();
