// `grace plan`: statistics (or a trace, profiled on the fly) + topology -> grace.plan/v1, with a per-layer summary.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/hardware.hpp"
#include "grace/planner.hpp"
#include "grace/pricing.hpp"
#include "grace/stats.hpp"
#include "grace/trace.hpp"

namespace grace::cli {
namespace {

std::function<int()> setup_plan(CLI::App& sub) {
    struct Args {
        std::string stats, trace, out, topology, hardware = "a100-testbed";
        std::optional<int> slots, redundant;
        bool no_fill = false;
        TraceOverrides overrides;
        std::optional<int> experts;
        PlanOptions options;
        bool quiet = false;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("--stats", a->stats, "Statistics folder (grace profile / grace import-stats)");
    sub.add_option("--trace", a->trace,
                   "Trace .npy [T, L, k]: profiled on the fly; with --stats, only checked to have the same E, L and k");
    sub.add_option("--topology", a->topology, "NxM: N nodes of M GPUs")->required()->check(topology_value());
    sub.add_option("--slots-per-gpu", a->slots,
                   "Expert slots per GPU, S: every GPU then holds exactly S instances (free slots are filled with "
                   "priced replicas); default unlimited")
        ->check(integer_in<int>(1));
    sub.add_option("--redundant-experts", a->redundant,
                   "The engines' flag: R redundant experts per layer, i.e. S = (E + R) / G slots per GPU")
        ->check(integer_in<int>(0));
    sub.add_flag("--no-fill-slots", a->no_fill,
                 "Treat the slot count as an upper bound only (exports then pad the free slots)");
    sub.add_option("--priced-moves", a->options.priced_moves,
                   "Slot-exact plans: at most N priced slot rewrites per layer after the fill (-1 = until none "
                   "lowers the priced time, 0 = none)")
        ->capture_default_str()
        ->check(integer_in<int>(-1));
    sub.add_option("--hardware", a->hardware,
                   "Hardware preset or grace.hardware/v1 file the planner prices placements with")
        ->capture_default_str()
        ->check(hardware_value());
    sub.add_option("--method", a->options.method,
                   "GROUPING[+REPLICATION[+ROUTING]], 'grace' (= priced+priced+tar), 'grace-paper' (the paper's "
                   "hierarchical+dynamic+tar) or 'eplb' (= eplb-hierarchical+eplb+sglang-static)")
        ->capture_default_str()
        ->check(parsed_by([](const std::string& m) { parse_method(m); }, "METHOD"));
    sub.add_option("--seed", a->options.seed, "Seed of the spectral k-means (and METIS)")
        ->capture_default_str()
        ->check(integer_in<uint64_t>(0));
    sub.add_option("--threads", a->options.num_threads, "Threads over layers (0 = all; the plan is identical)")
        ->capture_default_str()
        ->check(thread_count());
    sub.add_option("--wrr-period", a->options.wrr_period, "WRR period Q")
        ->capture_default_str()
        ->check(integer_in<int>(1, 65535));
    sub.add_option("--robust", a->options.robust_quantile,
                   "q in (0, 1]: replicate and weight routing by each expert's q-quantile load over the profile's "
                   "windows (needs grace profile --window-tokens), not its mean load")
        ->check(parsed_by(
            [](const std::string& v) {
                char* end = nullptr;
                const double q = std::strtod(v.c_str(), &end);
                GRACE_CHECK_ARG(!v.empty() && end && *end == '\0' && std::isfinite(q) && q > 0 && q <= 1,
                                "must be a number in (0, 1], got '", v, "'");
            },
            "Q"));
    sub.add_flag("--refine", a->options.refine, "Improving swaps after controlled grouping (spec §3 step 3)");
    sub.add_option("-o,--output", a->out, "Output plan JSON")->required();
    sub.add_flag("-q,--quiet", a->quiet, "No per-layer summary");
    add_trace_flags(sub, a->overrides, a->experts);
    return [a] {
        GRACE_CHECK_ARG(!a->stats.empty() || !a->trace.empty(), "grace plan needs --stats or --trace");
        Topology topo = Topology::parse(a->topology);
        GRACE_CHECK_ARG(!(a->slots && a->redundant), "give --slots-per-gpu or --redundant-experts, not both");
        if (a->slots) topo.slots_per_gpu = *a->slots;
        GRACE_CHECK_ARG(!a->no_fill || a->slots || a->redundant,
                        "--no-fill-slots needs --slots-per-gpu or --redundant-experts");
        a->options.fill_slots = !a->no_fill;
        if (a->experts) a->overrides.num_experts = *a->experts;
        auto t0 = std::chrono::steady_clock::now();
        RoutingStats st;
        std::string source;
        if (!a->stats.empty()) {
            st = load_stats(a->stats);
            source = a->stats;
            if (!a->trace.empty()) {
                TraceReader reader(a->trace, a->overrides);
                GRACE_CHECK_ARG(reader.num_experts() == st.num_experts, "statistics ", a->stats,
                                " have E=", st.num_experts, " experts but the trace ", a->trace,
                                " has E=", reader.num_experts());
                GRACE_CHECK_ARG(reader.num_layers() == st.num_layers, "statistics ", a->stats,
                                " have L=", st.num_layers, " layers but the trace ", a->trace,
                                " has L=", reader.num_layers());
                GRACE_CHECK_ARG(st.top_k == 0 || reader.top_k() == st.top_k, "statistics ", a->stats,
                                " have k=", st.top_k, " but the trace ", a->trace, " has k=", reader.top_k());
            } else if (a->experts) {
                GRACE_CHECK_ARG(*a->experts == st.num_experts, "statistics ", a->stats, " have E=", st.num_experts,
                                " experts but --experts says ", *a->experts);
            }
        } else {
            st = profile_trace_file(a->trace, a->overrides);
            source = a->trace;
        }
        if (a->redundant) {
            const int64_t G = topo.num_gpus(), R = *a->redundant, E = st.num_experts;
            GRACE_CHECK_ARG(R >= 0 && R <= G * E, "--redundant-experts must be in [0, G*E = ", G * E, "], got ", R);
            GRACE_CHECK_ARG((E + R) % G == 0, "--redundant-experts ", R, ": E + R = ", E + R,
                            " physical experts do not split evenly over ", G, " GPUs (engines need the same slot "
                            "count on every GPU; nearest: ", R + (G - (E + R) % G) % G, ")");
            topo.slots_per_gpu = static_cast<int>((E + R) / G);
        }
        std::string pricing_note;
        if (uses_pricing(a->options, topo)) {
            // The planner prices placements like `grace eval`: this hardware, the statistics' model shape.
            a->options.pricing = planner_pricing(load_hardware(a->hardware), st.model, &pricing_note);
        }
        ExpertPlan plan = make_plan(st, topo, a->options);
        if (!pricing_note.empty()) std::fprintf(stderr, "grace plan: note: %s\n", pricing_note.c_str());
        plan.source = source;
        if (a->options.robust_quantile > 0) plan.source += cat(" (robust q=", a->options.robust_quantile, ")");
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        save_plan(plan, a->out);
        std::printf("planned %s: E=%d L=%d k=%d on %s with %s in %.3f s -> %s\n", source.c_str(), plan.num_experts,
                    plan.num_layers, plan.top_k, topo.to_string().c_str(), plan.method.c_str(), secs, a->out.c_str());
        if (!a->quiet) {
            std::printf(
                "layer      r*   gamma   R  hot  fill  moves  instances  load max/mean before  predicted max/mean\n");
            for (const LayerPlan& lp : plan.layers) {
                auto ratio = [](const std::vector<double>& v) {
                    if (v.empty()) return 0.0;
                    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
                    return mean > 0 ? *std::max_element(v.begin(), v.end()) / mean : 0.0;
                };
                char rs[32];
                if (lp.r_star >= 0)
                    std::snprintf(rs, sizeof rs, "%7.3f", lp.r_star);
                else
                    std::snprintf(rs, sizeof rs, "%7s", "-");
                std::printf("%5d  %s  %6.3f  %2d  %3zu  %4d  %5d  %9d  %20.3f  %18.3f\n", lp.layer, rs, lp.gamma,
                            lp.num_replicas, lp.hot_experts.size(), lp.num_fill_replicas, lp.num_priced_moves,
                            lp.num_instances(), ratio(lp.gpu_load_before), ratio(lp.predicted_gpu_load));
            }
        }
        return 0;
    };
}

GRACE_COMMAND("plan", "Plan expert placement, replication and routing tables", setup_plan, 30);

}  // namespace
}  // namespace grace::cli
