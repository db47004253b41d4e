// Grouping speed (spec §3): spectral clustering and the knee search at the shapes the planner meets.
// BM_SpectralGrouping/E/n: fully non-uniform grouping of one layer; BM_KneeGrouping/E/n: the knee search from
// a given fully non-uniform grouping; BM_PlannerGroupingShape: the grouping work of hierarchical grouping for
// a whole model (level 1: spectral into N node groups with a capacity; level 2: spectral + knee per node).
// BM_TopEigenvectors/E/k/solver: the eigensolver alone (0 = dense tridiagonal, 1 = Lanczos), on the normalized
// affinity spectral grouping decomposes; it sets the dense/Lanczos switch in src/core/spectral.cpp.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "bench_util.hpp"
#include "core/grouping_internal.hpp"
#include "grace/grouping.hpp"

namespace {

using grace::bench::block_affinity;

void BM_SpectralGrouping(benchmark::State& state) {
    const int E = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1));
    const auto a = block_affinity(E, n + 2, 7);
    for (auto _ : state) benchmark::DoNotOptimize(grace::spectral_grouping(a, E, n));
}
BENCHMARK(BM_SpectralGrouping)
    ->Args({64, 8})
    ->Args({128, 2})
    ->Args({128, 8})
    ->Args({256, 4})
    ->Args({256, 32})
    ->Unit(benchmark::kMillisecond);

/// D^-1/2 (A + eps) D^-1/2 with zero diagonal, eps = 1% of the mean affinity: the matrix spectral grouping
/// decomposes (spectral.cpp).
std::vector<double> normalized_affinity(int E, int blocks) {
    std::vector<double> a = block_affinity(E, blocks, 7);
    double mean = 0;
    for (double x : a) mean += x;
    mean /= static_cast<double>(E) * (E - 1);
    std::vector<double> deg(E, 0.0);
    for (int i = 0; i < E; ++i)
        for (int j = 0; j < E; ++j)
            if (i != j) deg[i] += (a[static_cast<size_t>(i) * E + j] += 0.01 * mean);
    for (int i = 0; i < E; ++i)
        for (int j = 0; j < E; ++j)
            a[static_cast<size_t>(i) * E + j] =
                i == j ? 0.0 : a[static_cast<size_t>(i) * E + j] / std::sqrt(deg[i] * deg[j]);
    return a;
}

void BM_TopEigenvectors(benchmark::State& state) {
    const int E = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1));
    const auto solver = state.range(2) ? grace::detail::EigenSolver::kLanczos : grace::detail::EigenSolver::kDense;
    const auto m = normalized_affinity(E, k + 2);
    for (auto _ : state) benchmark::DoNotOptimize(grace::detail::top_eigenvectors(m, E, k, solver));
}
BENCHMARK(BM_TopEigenvectors)
    ->ArgsProduct({{32, 64, 128}, {2, 4, 8, 16}, {0, 1}})
    ->ArgsProduct({{256, 512, 1024}, {4, 8, 32, 64}, {0, 1}})
    ->Unit(benchmark::kMillisecond);

void BM_KneeGrouping(benchmark::State& state) {
    const int E = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1));
    const bool refine = state.range(2) != 0;
    const auto a = block_affinity(E, n + 2, 7);
    const grace::Grouping fnu = grace::spectral_grouping(a, E, n);
    size_t points = 0;
    for (auto _ : state) {
        const auto k = grace::knee_grouping(a, E, fnu, 0, refine);
        points = k.curve.size();
        benchmark::DoNotOptimize(k);
    }
    state.counters["grid_points"] = static_cast<double>(points);
}
BENCHMARK(BM_KneeGrouping)
    ->Args({64, 8, 0})
    ->Args({128, 8, 0})
    ->Args({128, 8, 1})
    ->Args({256, 8, 0})
    ->Args({256, 8, 1})
    ->Args({256, 32, 0})
    ->Unit(benchmark::kMillisecond);

/// One layer of hierarchical grouping: level 1 into N nodes (at least M experts each), level 2 per node.
void group_layer(const std::vector<double>& a, int E, int N, int M) {
    const grace::Grouping nodes = grace::spectral_grouping(a, E, N, {}, M, 0);
    for (const std::vector<int>& mem : nodes.members()) {
        const int m = static_cast<int>(mem.size());
        std::vector<double> sub(static_cast<size_t>(m) * m);
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < m; ++j)
                sub[static_cast<size_t>(i) * m + j] = a[static_cast<size_t>(mem[i]) * E + mem[j]];
        const grace::Grouping fnu = grace::spectral_grouping(sub, m, M);
        benchmark::DoNotOptimize(grace::knee_grouping(sub, m, fnu));
    }
}

void BM_PlannerGroupingShape(benchmark::State& state) {
    const int L = static_cast<int>(state.range(0)), E = static_cast<int>(state.range(1));
    const int N = static_cast<int>(state.range(2)), M = static_cast<int>(state.range(3));
    std::vector<std::vector<double>> layers;
    for (int l = 0; l < L; ++l) layers.push_back(block_affinity(E, N * M, 100 + l));
    for (auto _ : state) {
#pragma omp parallel for schedule(dynamic)
        for (int l = 0; l < L; ++l) group_layer(layers[l], E, N, M);
    }
}
// Qwen3-30B-A3B: 48 layers x 128 experts on 2 x 4; DeepSeek-V3: 58 x 256 on 4 x 8.
BENCHMARK(BM_PlannerGroupingShape)
    ->Args({48, 128, 2, 4})
    ->Args({58, 256, 4, 8})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
