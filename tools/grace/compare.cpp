// `grace compare`: the paper's component analysis (Table 1 / Figure 5 rows) plus the ecosystem baselines on
// one trace, for several topologies; writes DIR/compare.json, compare.csv, SVG figures and report.html.
#include "grace/compare.hpp"

#include <iostream>
#include <map>
#include <memory>
#include <sstream>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"

namespace grace::cli {

/// Progress bars for run_compare's stages (shared with `grace demo`).
CompareProgress make_compare_progress(std::shared_ptr<std::map<std::string, std::unique_ptr<Progress>>> bars,
                                      const std::string& prefix) {
    return [bars, prefix](const std::string& stage, int64_t done, int64_t total) {
        auto& bar = (*bars)[stage];
        if (!bar) bar = std::make_unique<Progress>(prefix + stage, total);
        bar->update(done);
        if (done >= total) {
            bar->finish();
            bars->erase(stage);
        }
    };
}

std::vector<Topology> parse_topologies(const std::string& text) {
    std::vector<Topology> out;
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, ','))
        if (!part.empty()) out.push_back(Topology::parse(part));
    GRACE_CHECK_ARG(!out.empty(), "--topology needs at least one NxM, got '", text, "'");
    return out;
}

namespace {

struct CompareArgs {
    std::string trace, profile_trace, topology = "2x2,2x4", hardware = "a100-testbed", output, reference, engine;
    int slots_per_gpu = 0;
    TraceOverrides overrides;
    std::optional<int> experts;
    int threads = 0;
    uint64_t seed = 0;
};

int run_compare_cmd(const CompareArgs& a) {
    CompareOptions opt;
    opt.topologies = parse_topologies(a.topology);
    GRACE_CHECK_ARG(a.slots_per_gpu >= 0, "--slots-per-gpu must be >= 1, got ", a.slots_per_gpu);
    if (a.slots_per_gpu > 0)
        for (Topology& t : opt.topologies) t.slots_per_gpu = a.slots_per_gpu;
    if (!a.engine.empty()) {
        const auto rows = engine_compare_rows(a.engine);
        opt.rows.insert(opt.rows.end(), rows.begin(), rows.end());
    }
    opt.hardware = load_hardware(a.hardware);
    opt.num_threads = a.threads;
    opt.seed = a.seed;
    // With --engine the natural baseline is what the engine does today: EPLB's placement in it.
    opt.reference = !a.reference.empty() ? a.reference : !a.engine.empty() ? "EPLB in " + a.engine : "Occult";
    opt.progress = make_compare_progress(std::make_shared<std::map<std::string, std::unique_ptr<Progress>>>(), "");
    TraceOverrides ov = a.overrides;
    if (a.experts) ov.num_experts = a.experts;
    check_output_dir(a.output);
    const CompareResult res = run_compare(a.trace, a.profile_trace, ov, opt);
    std::cout << format_compare_table(res);
    std::string desc = res.profile_path == res.trace_path
                           ? "Planned and evaluated on the same trace."
                           : "Planned on " + res.profile_path + ", evaluated on " + res.trace_path +
                                 " (cross-dataset generalization, paper Sec. 6.4).";
    write_dir_atomic(a.output, [&](const std::string& tmp) {
        write_report({{"Component analysis and baselines", desc, &res, true}}, tmp,
                     "GRACE comparison: " + res.model + " / " + res.dataset);
        save_compare_plans(res, tmp);
    });
    std::printf("profile %.2f s, plan %.2f s, replay+price %.2f s\nwrote %s/report.html\n", res.seconds_profile,
                res.seconds_plan, res.seconds_replay, a.output.c_str());
    return 0;
}

GRACE_COMMAND(
    "compare", "Plan with every method and compare them on a trace (paper Table 1 / Figure 5 and baselines)",
    [](CLI::App& sub) -> std::function<int()> {
        auto a = std::make_shared<CompareArgs>();
        sub.add_option("--trace", a->trace, "Evaluation trace .npy [T, L, k]")->required();
        sub.add_option("--profile-trace", a->profile_trace, "Trace to plan on (default: --trace)");
        add_trace_flags(sub, a->overrides, a->experts);
        sub.add_option("--topology", a->topology, "Comma-separated NxM list")->capture_default_str();
        sub.add_option(
               "--hardware", a->hardware,
               "Hardware preset (a100-testbed, h100-ib, h100-measured, h100-sm90) or grace.hardware/v1 JSON file")
            ->capture_default_str();
        sub.add_option("--reference", a->reference,
                       "Row the relative changes are taken against (default: Occult; with --engine, EPLB in ENGINE)");
        sub.add_option("--engine", a->engine,
                       "Add rows 'EPLB in ENGINE', 'GRACE in ENGINE' (each plan exported and routed as the engine "
                       "does: sglang, vllm, vllm-ascend, trtllm) and 'GRACE native'");
        sub.add_option("--slots-per-gpu", a->slots_per_gpu,
                       "Expert slots per GPU for every plan (and the engines' exports); default unlimited");
        sub.add_option("--seed", a->seed, "Planner seed")->capture_default_str();
        sub.add_option("--threads", a->threads, "Threads (0 = all); results are identical for any count");
        sub.add_option("-o,--output", a->output, "Output folder (replaced atomically)")->required();
        return [a] { return run_compare_cmd(*a); };
    },
    50);

}  // namespace
}  // namespace grace::cli
