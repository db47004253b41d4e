// Profiler throughput on in-memory traces (no file I/O): BM_Profile/<preset>/<threads>. The trace is
// `grace gen --dataset wikitext --seed 1 --no-weights` with GRACE_BENCH_TOKENS tokens (default 200000).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <map>
#include <string>

#include "grace/generator.hpp"
#include "grace/stats.hpp"

namespace {

const grace::RoutingTrace& trace_for(const std::string& preset) {
    static std::map<std::string, grace::RoutingTrace> cache;
    auto it = cache.find(preset);
    if (it == cache.end()) {
        grace::GeneratorOptions o;
        o.preset = preset;
        o.dataset = "wikitext";
        const char* env = std::getenv("GRACE_BENCH_TOKENS");  // the side-by-side script sets the trace size
        o.num_tokens = env ? std::atoll(env) : 200000;
        o.with_weights = false;
        o.seed = 1;
        it = cache.emplace(preset, grace::generate_trace(o)).first;
    }
    return it->second;
}

void BM_Profile(benchmark::State& state, const std::string& preset) {
    const auto& trace = trace_for(preset);
    grace::ProfileOptions o;
    o.num_threads = static_cast<int>(state.range(0));
    for (auto _ : state) benchmark::DoNotOptimize(grace::profile_trace(trace, o));
    state.SetItemsProcessed(state.iterations() * trace.num_tokens * trace.num_layers);
    state.counters["tokens"] = static_cast<double>(trace.num_tokens);
}

void BM_ProfileWithSourceLoads(benchmark::State& state) {
    const auto& trace = trace_for("qwen3-30b-a3b");
    grace::ProfileOptions o;
    o.num_threads = static_cast<int>(state.range(0));
    o.topology = grace::Topology::parse("2x8");
    for (auto _ : state) benchmark::DoNotOptimize(grace::profile_trace(trace, o));
    state.SetItemsProcessed(state.iterations() * trace.num_tokens * trace.num_layers);
}

void BM_Generate(benchmark::State& state) {
    grace::GeneratorOptions o;
    o.preset = "qwen3-30b-a3b";
    o.num_tokens = 50000;
    o.with_weights = false;
    o.num_threads = static_cast<int>(state.range(0));
    for (auto _ : state) benchmark::DoNotOptimize(grace::generate_trace(o));
    state.SetItemsProcessed(state.iterations() * o.num_tokens * 48);
}

}  // namespace

BENCHMARK_CAPTURE(BM_Profile, qwen3, std::string("qwen3-30b-a3b"))->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Profile, olmoe, std::string("olmoe"))->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Profile, mixtral, std::string("mixtral"))->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ProfileWithSourceLoads)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Generate)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
