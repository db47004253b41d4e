// `grace compare`: the paper's component analysis (Table 1 / Figure 5 rows) plus the ecosystem baselines on
// one trace, for several topologies; writes DIR/compare.json, compare.csv, SVG figures and report.html.
#include "grace/compare.hpp"

#include <iostream>
#include <map>
#include <memory>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "model_flags.hpp"

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

namespace {

struct CompareArgs {
    std::string trace, profile_trace, topology = "2x2,2x4", hardware = "a100-testbed", output, reference, engine;
    std::string model_config;
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
    if (const auto model = explicit_model(a.model_config, a.overrides.model))
        opt.shape = explicit_model_shape(opt.hardware, *model);
    opt.num_threads = a.threads;
    opt.seed = a.seed;
    // With --engine the natural baseline is what the engine does today: EPLB's placement in it.
    opt.reference = !a.reference.empty() ? a.reference : !a.engine.empty() ? "EPLB in " + a.engine : "Occult";
    opt.progress = make_compare_progress(std::make_shared<std::map<std::string, std::unique_ptr<Progress>>>(), "");
    TraceOverrides ov = a.overrides;
    if (a.experts) ov.num_experts = a.experts;
    check_output_folder(a.output, "compare");  // a wrong -o fails before the comparison runs
    const CompareResult res = run_compare(a.trace, a.profile_trace, ov, opt);
    std::cout << format_compare_table(res);
    std::string desc = res.profile_path == res.trace_path
                           ? "Planned and evaluated on the same trace."
                           : "Planned on " + res.profile_path + ", evaluated on " + res.trace_path +
                                 " (cross-dataset generalization, paper Sec. 6.4).";
    write_dir_atomic(a.output, "compare", [&](const std::string& tmp) {
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
        add_model_config_flag(sub, a->model_config);
        sub.add_option("--topology", a->topology, "Comma-separated NxM list")
            ->capture_default_str()
            ->check(topology_list());
        sub.add_option(
               "--hardware", a->hardware,
               "Hardware preset (a100-testbed, h100-ib, h100-measured, h100-sm90) or grace.hardware/v1 JSON file")
            ->capture_default_str()
            ->check(hardware_value());
        std::vector<std::string> rows;  // every row a comparison can have, engine rows included
        for (const CompareRow& row : default_compare_rows()) rows.push_back(row.name);
        for (const char* engine : {"sglang", "vllm", "vllm-ascend", "trtllm"})
            for (const CompareRow& row : engine_compare_rows(engine))
                if (std::find(rows.begin(), rows.end(), row.name) == rows.end()) rows.push_back(row.name);
        sub.add_option("--reference", a->reference,
                       "Row the relative changes are taken against (default: Occult; with --engine, EPLB in ENGINE)")
            ->check(CLI::IsMember(rows));
        sub.add_option("--engine", a->engine,
                       "Add rows 'EPLB in ENGINE', 'GRACE in ENGINE' (each plan exported and routed as the engine "
                       "does: sglang, vllm, vllm-ascend, trtllm) and 'GRACE native'")
            ->check(CLI::IsMember({"sglang", "vllm", "vllm-ascend", "trtllm"}));
        sub.add_option("--slots-per-gpu", a->slots_per_gpu,
                       "Expert slots per GPU for every plan (and the engines' exports); default unlimited")
            ->check(integer_in<int>(1));
        sub.add_option("--seed", a->seed, "Planner seed")->capture_default_str()->check(integer_in<uint64_t>(0));
        sub.add_option("--threads", a->threads, "Threads (0 = all); results are identical for any count")
            ->check(thread_count());
        sub.add_option("-o,--output", a->output,
                       "Output folder: new, empty, or an earlier grace compare output (replaced atomically)")
            ->required();
        return [a] { return run_compare_cmd(*a); };
    },
    50);

}  // namespace
}  // namespace grace::cli
