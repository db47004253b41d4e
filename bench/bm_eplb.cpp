// EPLB speed (spec §8) at DeepSeek-V3 scale: 58 layers x 256 experts, 288 physical slots (256 + 32 redundant),
// 4 nodes, 32 GPUs, 8 expert groups (hierarchical policy); the same input with num_groups = 7 takes the global
// policy. bench/eplb_reference.py times the NumPy re-statement on the identical input.

#include <benchmark/benchmark.h>

#include "bench_util.hpp"
#include "grace/eplb.hpp"

namespace {

void BM_EplbDeepSeekV3Hierarchical(benchmark::State& state) {
    const auto w = grace::bench::skewed_loads(58, 256, 2024);
    for (auto _ : state) benchmark::DoNotOptimize(grace::rebalance_experts(w, 58, 256, 288, 8, 4, 32));
}
BENCHMARK(BM_EplbDeepSeekV3Hierarchical)->Unit(benchmark::kMillisecond);

void BM_EplbDeepSeekV3Global(benchmark::State& state) {
    const auto w = grace::bench::skewed_loads(58, 256, 2024);
    for (auto _ : state) benchmark::DoNotOptimize(grace::rebalance_experts(w, 58, 256, 288, 7, 4, 32));
}
BENCHMARK(BM_EplbDeepSeekV3Global)->Unit(benchmark::kMillisecond);

void BM_EplbReadmeExample(benchmark::State& state) {
    const std::vector<double> w = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
                                   20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
    for (auto _ : state) benchmark::DoNotOptimize(grace::rebalance_experts(w, 2, 12, 16, 4, 2, 8));
}
BENCHMARK(BM_EplbReadmeExample)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
