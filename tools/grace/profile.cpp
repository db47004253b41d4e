// `grace profile`: trace -> statistics folder (spec §2), with a short per-layer summary.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/stats.hpp"
#include "grace/trace.hpp"

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

// --mix: comma-separated weights, each a finite number > 0. Throws kInvalidArgument naming the bad entry.
std::vector<double> parse_mix_weights(const std::string& text) {
    std::vector<double> out;
    size_t start = 0;
    for (;;) {
        const size_t comma = text.find(',', start);
        const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        char* end = nullptr;
        const double w = std::strtod(item.c_str(), &end);
        GRACE_CHECK_ARG(!item.empty() && end && *end == '\0' && std::isfinite(w) && w > 0, "--mix weight ",
                        out.size() + 1, " is '", item, "'; weights must be finite numbers > 0");
        out.push_back(w);
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return out;
}

std::function<int()> setup_profile(CLI::App& sub) {
    struct Args {
        std::vector<std::string> traces;
        std::string out, topology, mix;
        TraceOverrides overrides;
        std::optional<int> experts;
        ProfileOptions options;
        bool quiet = false;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("traces", a->traces,
                   "Trace .npy [T, L, k] or [T, k]; several traces are merged into one mix (same E, L and k)")
        ->required()
        ->expected(1, -1);
    sub.add_option("-o,--output", a->out, "Output statistics folder (new, empty, or an earlier grace stats folder)")
        ->required();
    sub.add_option("--mix", a->mix,
                   "wA,wB,...: one weight per trace; trace d gets the share w_d/sum(w) of the mix (default: each "
                   "trace weighs its token count, i.e. the traces concatenated)")
        ->check(parsed_by([](const std::string& m) { parse_mix_weights(m); }, "WEIGHTS"));
    sub.add_option("--window-tokens", a->options.window_tokens,
                   "Also record expert loads per window of this many tokens (for grace plan --robust); 0 = none")
        ->capture_default_str()
        ->check(integer_in<int64_t>(0));
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
        const size_t D = a->traces.size();
        const std::vector<double> weights = a->mix.empty() ? std::vector<double>() : parse_mix_weights(a->mix);
        GRACE_CHECK_ARG(weights.empty() || weights.size() == D, "--mix gives ", weights.size(), " weights for ", D,
                        " traces");
        GRACE_CHECK_ARG(D == 1 || !a->overrides.weights_path, "--weights names the gate weights of one trace; with ", D,
                        " traces give each its NAME.json");
        std::string out = a->out;
        while (out.size() > 1 && out.back() == '/') out.pop_back();
        check_output_folder(out, "stats");  // a wrong -o fails before the profiling
        // A trace named twice (also as another path to the same file) would silently count twice in the mix.
        for (size_t d = 1; d < D; ++d)
            for (size_t e = 0; e < d; ++e) {
                std::error_code ec;
                GRACE_CHECK_ARG(!std::filesystem::equivalent(a->traces[e], a->traces[d], ec), a->traces[d],
                                " is the same file as ", a->traces[e], "; a mix names each trace once");
            }
        // Every trace's header first: a mix of unlike traces fails before any of them is profiled.
        TraceOverrides per_trace = a->overrides;  // --model / --dataset name the mix, not each trace
        if (D > 1) per_trace.model.reset(), per_trace.dataset.reset();
        {
            const TraceReader first(a->traces[0], per_trace);
            for (size_t d = 1; d < D; ++d) {
                const TraceReader r(a->traces[d], per_trace);
                auto same = [&](const char* what, int mine, int theirs) {
                    GRACE_CHECK_INPUT(mine == theirs, a->traces[d], " has ", what, "=", mine, " but ", a->traces[0],
                                      " has ", what, "=", theirs, "; a mix needs the same E, L and k in every trace");
                };
                same("E", r.num_experts(), first.num_experts());
                same("L", r.num_layers(), first.num_layers());
                same("k", r.top_k(), first.top_k());
            }
        }
        auto t0 = std::chrono::steady_clock::now();
        std::vector<RoutingStats> parts;
        for (const std::string& path : a->traces) parts.push_back(profile_trace_file(path, per_trace, a->options));
        RoutingStats st = merge_stats(parts, a->traces, weights);
        parts.clear();
        if (a->overrides.model) st.model = *a->overrides.model;
        if (a->overrides.dataset) st.dataset = *a->overrides.dataset;
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        save_stats(st, out);
        std::string names = a->traces[0];
        for (size_t d = 1; d < D; ++d) names += " + " + a->traces[d];
        std::printf("profiled %s: T=%lld L=%d k=%d E=%d%s%s in %.3f s -> %s\n", names.c_str(),
                    static_cast<long long>(st.num_tokens), st.num_layers, st.top_k, st.num_experts,
                    st.num_gpus ? (" G=" + std::to_string(st.num_gpus)).c_str() : "",
                    st.window_tokens ? (" windows=" + std::to_string(st.num_windows())).c_str() : "", secs,
                    out.c_str());
        if (D > 1) {
            for (const StatsSource& src : st.sources)
                std::printf("  %s: T=%lld weight=%g share=%.4f scale=%.6g\n", src.trace.c_str(),
                            static_cast<long long>(src.num_tokens), src.weight,
                            src.scale * static_cast<double>(src.num_tokens) / static_cast<double>(st.num_tokens),
                            src.scale);
        }
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
