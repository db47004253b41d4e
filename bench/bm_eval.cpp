// Evaluator replay speed: token-layer routing decisions per second on one core (items_per_second), at the
// qwen3-30b-a3b shape (E = 128, k = 8) on 2x4 GPUs, with a plan that replicates 16 hot experts per layer
// (as hierarchical + dynamic replication does) and counts all schemes at once.
#include <benchmark/benchmark.h>

#include <algorithm>

#include "core/rng.hpp"
#include "grace/eval.hpp"
#include "grace/routing.hpp"

namespace {

using namespace grace;

constexpr int kExperts = 128, kTopK = 8, kLayers = 4;
constexpr int64_t kTokens = 1 << 16;

const RoutingTrace& bench_trace() {
    static const RoutingTrace trace = [] {
        RoutingTrace t;
        t.num_tokens = kTokens;
        t.num_layers = kLayers;
        t.top_k = kTopK;
        t.num_experts = kExperts;
        t.expert_ids.resize(static_cast<size_t>(kTokens) * kLayers * kTopK);
        Rng rng(3);
        for (int64_t i = 0; i < kTokens * kLayers; ++i) {
            int32_t* row = t.expert_ids.data() + i * kTopK;
            int n = 0;
            while (n < kTopK) {
                // Skewed popularity: low ids are hotter.
                int e = static_cast<int>(rng.below(kExperts) * rng.below(kExperts) / kExperts);
                if (std::find(row, row + n, e) == row + n) row[n++] = e;
            }
        }
        return t;
    }();
    return trace;
}

ExpertPlan bench_plan(RoutingPolicy policy) {
    ExpertPlan p;
    p.num_experts = kExperts;
    p.num_layers = kLayers;
    p.top_k = kTopK;
    p.topology = Topology{2, 4, std::nullopt};
    const int G = 8;
    for (int l = 0; l < kLayers; ++l) {
        LayerPlan lp;
        lp.layer = l;
        lp.gpu_experts.assign(G, {});
        lp.primary_gpu.resize(kExperts);
        for (int e = 0; e < kExperts; ++e) {
            const int g = (e * 7 + l) % G;
            lp.primary_gpu[e] = g;
            lp.gpu_experts[g].push_back(e);
            if (e < 16)  // hot experts: replicas on three more GPUs, one of them on the other node
                for (int r : {1, 2, 5}) lp.gpu_experts[(g + r) % G].push_back(e);
        }
        lp.policy = policy;
        lp.finalize(kExperts);
        for (int e = 0; e < 16; ++e) lp.wrr_weights[e] = round_weights({3, 2, 2, 1}, lp.wrr_period);
        p.layers.push_back(std::move(lp));
    }
    p.validate();
    return p;
}

void run_replay(benchmark::State& state, RoutingPolicy policy) {
    const RoutingTrace& trace = bench_trace();
    const ExpertPlan plan = bench_plan(policy);
    ReplayOptions opt;
    opt.num_threads = 1;
    for (auto _ : state) {
        Replayer r(plan, trace.num_tokens, opt);
        for (int l = 0; l < kLayers; ++l) r.consume_layer(trace, 0, l);
        benchmark::DoNotOptimize(r.counts());
    }
    state.SetItemsProcessed(state.iterations() * kTokens * kLayers * kTopK);
    state.counters["token_layers_per_s"] =
        benchmark::Counter(static_cast<double>(state.iterations()) * kTokens * kLayers, benchmark::Counter::kIsRate);
}

void BM_TarReplay(benchmark::State& state) { run_replay(state, RoutingPolicy::kTar); }
void BM_WrrReplay(benchmark::State& state) { run_replay(state, RoutingPolicy::kWrr); }
void BM_PrimaryReplay(benchmark::State& state) { run_replay(state, RoutingPolicy::kPrimary); }
void BM_VllmReplay(benchmark::State& state) { run_replay(state, RoutingPolicy::kVllm); }

BENCHMARK(BM_TarReplay)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_WrrReplay)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PrimaryReplay)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_VllmReplay)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
