// `grace replan`: a deployed plan + statistics of the traffic it now serves -> a plan reachable from it by at most
// K slot rewrites (or B bytes of expert weights moved), chosen by priced gain; prints and optionally writes the
// moves, the bytes and the predicted gain.
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/hardware.hpp"
#include "grace/io.hpp"
#include "grace/pricing.hpp"
#include "grace/replan.hpp"
#include "grace/stats.hpp"
#include "model_flags.hpp"

namespace grace::cli {
namespace {

std::function<int()> setup_replan(CLI::App& sub) {
    struct Args {
        std::string plan, stats, out, moves_out, hardware = "a100-testbed", model_config;
        std::optional<int64_t> max_moves;
        std::optional<double> max_bytes, max_moves_fraction;
        int weight_bytes = 2;
        int threads = 0;
        bool quiet = false;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("--plan", a->plan, "The deployed plan (grace.plan/v1)")->required();
    sub.add_option("--stats", a->stats, "Statistics of the traffic it now serves (grace profile)")->required();
    sub.add_option("--max-moves", a->max_moves, "At most K slot rewrites (one expert's weights copied each)")
        ->check(integer_in<int64_t>(0));
    sub.add_option("--max-moves-fraction", a->max_moves_fraction,
                   "At most this fraction of the plan's instances rewritten (e.g. 0.25)")
        ->check(CLI::Range(0.0, 1.0));
    sub.add_option("--max-bytes", a->max_bytes, "At most this many bytes of expert weights moved")
        ->check(CLI::Range(0.0, 1e18));
    sub.add_option("--hardware", a->hardware, "Hardware preset or grace.hardware/v1 file the moves are priced with")
        ->capture_default_str()
        ->check(hardware_value());
    add_model_config_flag(sub, a->model_config);
    sub.add_option("--weight-bytes", a->weight_bytes, "Bytes per expert weight element (2 = bf16, 1 = fp8)")
        ->check(integer_in<int>(1, 8))
        ->capture_default_str();
    sub.add_option("--threads", a->threads, "Threads over layers (0 = all; the result is identical)")
        ->check(thread_count())
        ->capture_default_str();
    sub.add_option("-o,--output", a->out, "Output plan JSON")->required();
    sub.add_option("--moves", a->moves_out, "Also write the moves and predicted gains as JSON here");
    sub.add_flag("-q,--quiet", a->quiet, "No per-layer summary");
    return [a] {
        GRACE_CHECK_ARG(a->max_moves || a->max_bytes || a->max_moves_fraction,
                        "grace replan needs a budget: --max-moves, --max-moves-fraction or --max-bytes");
        GRACE_CHECK_ARG(!(a->max_moves && a->max_moves_fraction),
                        "give --max-moves or --max-moves-fraction, not both");
        check_output_dir(a->out);
        if (!a->moves_out.empty()) check_output_dir(a->moves_out);
        const ExpertPlan old_plan = load_plan(a->plan);
        const RoutingStats st = load_stats(a->stats);
        const HardwareModel hw = load_hardware(a->hardware);
        const std::optional<ModelConfig> model = explicit_model(a->model_config, std::nullopt);
        ModelShape shape;
        ReplanOptions opt;
        std::string note;
        if (model) {
            shape = explicit_model_shape(hw, *model);
            check_model_shape(shape, st.num_experts, st.num_layers, "the statistics");
            opt.pricing = placement_pricing(hw, shape);
        } else {
            shape = resolve_model_shape(hw, st.model);  // the byte budget needs the expert size
            opt.pricing = placement_pricing(hw, shape);
        }
        opt.bytes_per_expert = 3.0 * shape.hidden * shape.intermediate * a->weight_bytes;
        int64_t instances = 0;
        for (const auto& lp : old_plan.layers) instances += lp.num_instances();
        if (a->max_moves) opt.max_moves = *a->max_moves;
        if (a->max_moves_fraction)
            opt.max_moves = static_cast<int64_t>(std::floor(*a->max_moves_fraction * static_cast<double>(instances)));
        if (a->max_bytes) opt.max_bytes = *a->max_bytes;
        opt.num_threads = a->threads;
        const ReplanResult r = replan(old_plan, st, opt);
        ExpertPlan plan = r.plan;
        plan.source = "replan of " + a->plan + " on " + a->stats;
        plan.validate();
        // The plan and its moves belong together: both are staged, then committed, the plan last.
        OutputSet out;
        const double before = std::accumulate(r.time_before.begin(), r.time_before.end(), 0.0);
        const double after = std::accumulate(r.time_after.begin(), r.time_after.end(), 0.0);
        if (!a->moves_out.empty()) {
            nlohmann::ordered_json j;
            j["format"] = "grace.replan/v1";
            j["plan"] = a->plan;
            j["stats"] = a->stats;
            j["bytes_per_expert"] = opt.bytes_per_expert;
            j["num_moves"] = r.moves.size();
            j["bytes_moved"] = r.bytes_moved;
            j["predicted_seconds_before"] = before;
            j["predicted_seconds_after"] = after;
            nlohmann::ordered_json moves = nlohmann::ordered_json::array();
            for (const SlotMove& m : r.moves)
                moves.push_back({{"layer", m.layer},
                                 {"gpu", m.gpu},
                                 {"removed", m.removed},
                                 {"added", m.added},
                                 {"gain_seconds", m.gain_seconds}});
            j["moves"] = std::move(moves);
            nlohmann::ordered_json layers = nlohmann::ordered_json::array();
            for (size_t l = 0; l < r.time_before.size(); ++l)
                layers.push_back({{"layer", l}, {"before", r.time_before[l]}, {"after", r.time_after[l]}});
            j["layers"] = std::move(layers);
            out.add_text(a->moves_out, j.dump(1) + "\n");
        }
        out.add_text(a->out, plan_to_json(plan));
        out.commit();
        std::printf("replanned %s on %s: %zu of %lld instances rewritten (%.3f GB of expert weights), predicted MoE "
                    "time %.3f -> %.3f ms (%.2f%% lower) -> %s\n",
                    a->plan.c_str(), a->stats.c_str(), r.moves.size(), static_cast<long long>(instances),
                    r.bytes_moved / 1e9, before * 1e3, after * 1e3, before > 0 ? 100.0 * (before - after) / before : 0.0,
                    a->out.c_str());
        if (!a->quiet) {
            std::printf("layer  moves  predicted before (ms)  after (ms)\n");
            std::vector<int> per_layer(r.time_before.size(), 0);
            for (const SlotMove& m : r.moves) ++per_layer[m.layer];
            for (size_t l = 0; l < r.time_before.size(); ++l)
                std::printf("%5zu  %5d  %21.4f  %10.4f\n", l, per_layer[l], r.time_before[l] * 1e3,
                            r.time_after[l] * 1e3);
        }
        return 0;
    };
}

GRACE_COMMAND("replan", "Re-plan a deployed plan for new statistics with a bounded number of expert moves",
              setup_replan, 32);

}  // namespace
}  // namespace grace::cli
