// `grace profile`: trace -> statistics folder (spec §2), with a short per-layer summary.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/stats.hpp"

namespace grace::cli {
namespace {

/// Share of the affinity mass held by the top 10% of pairs i < j of layer l.
double top_pair_share(const RoutingStats& st, int l) {
    const int E = st.num_experts;
    std::vector<int64_t> pairs;
    for (int i = 0; i < E; ++i)
        for (int j = i + 1; j < E; ++j) pairs.push_back(st.affinity_at(l, i, j));
    if (pairs.empty()) return 0;
    const size_t top = std::max<size_t>(1, (pairs.size() + 9) / 10);
    std::partial_sort(pairs.begin(), pairs.begin() + top, pairs.end(), std::greater<>());
    double total = std::accumulate(pairs.begin(), pairs.end(), 0.0);
    return total > 0 ? std::accumulate(pairs.begin(), pairs.begin() + top, 0.0) / total : 0.0;
}

std::function<int()> setup_profile(CLI::App& sub) {
    struct Args {
        std::string trace, out, topology;
        TraceOverrides overrides;
        std::optional<int> experts;
        ProfileOptions options;
        bool quiet = false;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("trace", a->trace, "Trace .npy [T, L, k] or [T, k]")->required();
    sub.add_option("-o,--output", a->out, "Output statistics folder (new, empty, or an earlier grace stats folder)")
        ->required();
    sub.add_option("--topology", a->topology, "NxM: also count per-source-GPU loads (home GPU floor(t*G/T))")
        ->check(topology_value());
    sub.add_option("--threads", a->options.num_threads, "Threads (0 = all; results are identical for any count)")
        ->capture_default_str()
        ->check(thread_count());
    sub.add_option("--chunk", a->options.chunk_tokens, "Tokens read per chunk")
        ->capture_default_str()
        ->check(integer_in<int64_t>(1));
    sub.add_flag("-q,--quiet", a->quiet, "No per-layer summary");
    add_trace_flags(sub, a->overrides, a->experts);
    return [a] {
        if (a->experts) a->overrides.num_experts = *a->experts;
        if (!a->topology.empty()) a->options.topology = Topology::parse(a->topology);
        std::string out = a->out;
        while (out.size() > 1 && out.back() == '/') out.pop_back();
        check_output_folder(out, "stats");  // a wrong -o fails before the profiling
        auto t0 = std::chrono::steady_clock::now();
        RoutingStats st = profile_trace_file(a->trace, a->overrides, a->options);
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        save_stats(st, out);
        std::printf("profiled %s: T=%lld L=%d k=%d E=%d%s in %.3f s -> %s\n", a->trace.c_str(),
                    static_cast<long long>(st.num_tokens), st.num_layers, st.top_k, st.num_experts,
                    st.num_gpus ? (" G=" + std::to_string(st.num_gpus)).c_str() : "", secs, out.c_str());
        if (!a->quiet) {
            std::printf("layer  load max/mean  min/mean  top10%%-pair share\n");
            for (int l = 0; l < st.num_layers; ++l) {
                const int64_t* ld = st.layer_load(l);
                double mean = std::accumulate(ld, ld + st.num_experts, 0.0) / st.num_experts;
                double mx = static_cast<double>(*std::max_element(ld, ld + st.num_experts));
                double mn = static_cast<double>(*std::min_element(ld, ld + st.num_experts));
                std::printf("%5d  %13.2f  %8.3f  %17.3f\n", l, mean > 0 ? mx / mean : 0.0, mean > 0 ? mn / mean : 0.0,
                            top_pair_share(st, l));
            }
        }
        return 0;
    };
}

GRACE_COMMAND("profile", "Profile a trace into routing statistics (affinity, loads)", setup_profile, 20);

}  // namespace
}  // namespace grace::cli
