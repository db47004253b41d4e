#include "eval_modes.hpp"

#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/migration.hpp"

namespace grace::cli {
namespace {

using nlohmann::json;

std::string stem_of(const std::string& output) {
    std::string stem = output;
    if (stem.size() > 5 && stem.substr(stem.size() - 5) == ".json") stem.resize(stem.size() - 5);
    return stem;
}

std::string hex(uint64_t v) {
    std::ostringstream os;
    os << std::hex << std::setw(16) << std::setfill('0') << v;
    return os.str();
}

}  // namespace

int eval_adaptive(const RoutingTrace& trace, const ExpertPlan& plan, const EvalOptions& opt, const ModelShape& shape,
                  const AdaptationOptions& adapt, const std::string& output) {
    AdaptiveReplay ar = replay_adaptive(trace, plan, opt.replay, adapt);
    EvalReport report = price_counts(ar.counts, plan, opt.scheme, opt.hardware, shape, trace.num_tokens);
    report.dataset = trace.dataset;
    report.policy = routing_label(plan, opt.replay.policy);
    json j = json::parse(report_to_json(report));
    j["adaptation"] = {{"interval_batches", adapt.interval},
                       {"batch_tokens_per_gpu", adapt.batch_tokens},
                       {"decay", adapt.decay},
                       {"batches", ar.batches},
                       {"updates", ar.updates},
                       {"tables_hash", hex(combine_tables_hashes(ar.layer_hashes))},
                       {"final_wrr_weights", ar.final_weights}};
    const std::string stem = stem_of(output);
    OutputSet out;
    out.add_text(stem + ".csv", report_to_csv(report));
    out.add_text(stem + ".json", j.dump(2) + "\n");
    out.commit();
    std::cout << format_report_table(report);
    std::cout << "adaptation: " << ar.updates << " updates over " << ar.batches << " batches of " << adapt.batch_tokens
              << " tokens per GPU (every " << adapt.interval << ")\n";
    std::cout << "wrote " << stem << ".json and " << stem << ".csv\n";
    return 0;
}

int eval_switch(const RoutingTrace& trace, const ExpertPlan& plan, const ExpertPlan& plan2, const EvalOptions& opt,
                const ModelShape& shape, int64_t switch_at, double bytes_per_expert, const std::string& plan_paths,
                const std::string& output) {
    check_switchable(plan, plan2);
    check_plan_matches_trace(plan2, trace);
    trace.validate();  // here, not in the replay of the second slice, whose errors named tokens from the slice's start
    const int64_t T = trace.num_tokens;
    GRACE_CHECK_ARG(switch_at >= 1 && switch_at < T, "--switch-at ", switch_at, " must be inside the trace's [1, ", T,
                    ") tokens");
    const MigrationCost mig = migration_cost(plan, plan2, bytes_per_expert, opt.hardware);
    json phases = json::array();
    std::string csv =
        "phase,plan,first_token,num_tokens,end_to_end_s,moe_layer_time_s,all_to_all_time_s,migration_bytes,migration_"
        "time_s\n";
    double serving = 0;
    int phase = 0;
    for (const auto& [p, b, e] : {std::tuple<const ExpertPlan*, int64_t, int64_t>{&plan, 0, switch_at},
                                  std::tuple<const ExpertPlan*, int64_t, int64_t>{&plan2, switch_at, T}}) {
        const RoutingTrace part = trace.slice_tokens(b, e);
        EvalReport r = price_counts(replay_trace(part, *p, opt.replay), *p, opt.scheme, opt.hardware, shape, e - b);
        r.dataset = trace.dataset;
        r.policy = routing_label(*p, opt.replay.policy);
        json pj = json::parse(report_to_json(r));
        pj["first_token"] = b;
        phases.push_back(pj);
        double a2a = 0, moe = 0;
        for (const auto& l : r.layers) a2a += l.all_to_all_time_s, moe += l.moe_layer_time_s;
        std::ostringstream row;
        row << std::setprecision(9) << phase << "," << (phase == 0 ? "plan" : "switch_plan") << "," << b << "," << e - b
            << "," << r.total.end_to_end_s << "," << moe << "," << a2a << ",,\n";
        csv += row.str();
        serving += r.total.end_to_end_s;
        std::cout << "phase " << phase << " (" << (phase == 0 ? "--plan" : "--switch-plan") << ", tokens " << b << ".."
                  << e - 1 << "): end-to-end " << r.total.end_to_end_s * 1e3 << " ms\n";
        ++phase;
    }
    json j = {{"format", "grace.eval-switch/v1"},
              {"plans", plan_paths},
              {"switch_at", switch_at},
              {"num_tokens", T},
              {"serving_time_s", serving},
              {"migration",
               {{"bytes_per_expert", mig.bytes_per_expert},
                {"experts_received", mig.experts_received},
                {"bytes_received", mig.bytes_received},
                {"intra_node_bytes_in", mig.intra_node_bytes_in},
                {"cross_node_bytes_in", mig.cross_node_bytes_in},
                {"total_experts", mig.total_experts},
                {"total_bytes", mig.total_bytes},
                {"intra_node_time_s", mig.intra_node_time_s},
                {"cross_node_time_s", mig.cross_node_time_s},
                {"time_s", mig.time_s},
                {"links",
                 "copies from a GPU of the receiver's node over NVLink (intra_node_bandwidth) when one "
                 "holds the expert, else over the NICs (cross_node_bandwidth); bandwidth only"}}},
              {"phases", phases}};
    std::ostringstream mrow;
    mrow << std::setprecision(9) << "migration,switch_plan," << switch_at << ",,,,," << mig.total_bytes << ","
         << mig.time_s << "\n";
    csv += mrow.str();
    const std::string stem = stem_of(output);
    OutputSet out;
    out.add_text(stem + ".csv", csv);
    out.add_text(stem + ".json", j.dump(2) + "\n");
    out.commit();
    std::cout << "serving " << serving * 1e3 << " ms; migration " << mig.total_experts << " experts, "
              << mig.total_bytes / 1e9 << " GB, " << mig.time_s * 1e3 << " ms (reported apart)\n";
    std::cout << "wrote " << stem << ".json and " << stem << ".csv\n";
    return 0;
}

}  // namespace grace::cli
