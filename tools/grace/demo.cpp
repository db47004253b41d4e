// `grace demo`: the README's main job. Generates the default olmoe trace (wikitext) and a second dataset's trace,
// plans with every method, evaluates on 2x2 and 2x4, checks cross-dataset generalization (plan on one dataset,
// evaluate on the other), prints the comparison and writes the report.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>

#include "command.hpp"
#include "grace/compare.hpp"
#include "grace/error.hpp"
#include "grace/generator.hpp"
#include "grace/io.hpp"

namespace grace::cli {

CompareProgress make_compare_progress(std::shared_ptr<std::map<std::string, std::unique_ptr<Progress>>> bars,
                                      const std::string& prefix);

namespace {

struct DemoArgs {
    std::string output = "out/demo", preset = "olmoe", dataset = "wikitext", other = "github", topology = "2x2,2x4";
    std::string hardware = "a100-testbed";
    int64_t tokens = 49152;  // one round of the paper's 512x(64+32) workload (the larger of its two)
    uint64_t seed = 0;
    int threads = 0;
};

int run_demo(const DemoArgs& a) {
    const auto start = std::chrono::steady_clock::now();
    CompareOptions opt;
    opt.topologies = parse_topologies(a.topology);
    opt.hardware = load_hardware(a.hardware);
    opt.num_threads = a.threads;
    opt.seed = a.seed;
    GRACE_CHECK_ARG(a.other != a.dataset, "--other-dataset must differ from --dataset for the cross-dataset check");
    std::string shown = a.output;
    while (shown.size() > 1 && shown.back() == '/') shown.pop_back();
    // The whole demo folder (traces/ and report/) is one grace "demo" output: built in a temporary folder beside
    // it and renamed into place at the end. An existing folder that is not an earlier demo output is refused
    // before any work, so `-o .` can never replace the user's files.
    const std::filesystem::path parent = std::filesystem::path(shown).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent);
    check_output_folder(shown, "demo");
    const std::string report_dir = (std::filesystem::path(shown) / "report").string();
    write_dir_atomic(shown, "demo", [&](const std::string& tmp) {
        const std::string traces = (std::filesystem::path(tmp) / "traces").string();
        std::filesystem::create_directory(traces);
        // Paths recorded in the report name the final folder, not the temporary one.
        auto final_path = [&](std::string p) { return p.rfind(tmp, 0) == 0 ? shown + p.substr(tmp.size()) : p; };
        auto run = [&](const std::string& trace, const std::string& profile) {
            CompareResult r = run_compare(trace, profile, {}, opt);
            r.trace_path = final_path(r.trace_path);
            r.profile_path = final_path(r.profile_path);
            return r;
        };

        auto generate = [&](const std::string& dataset) {
            GeneratorOptions g;
            g.preset = a.preset;
            g.dataset = dataset;
            g.num_tokens = a.tokens;
            g.seed = a.seed;
            g.num_threads = a.threads;
            Progress p("generating " + dataset, 1);
            p.update(0);
            const RoutingTrace t = generate_trace(g);
            const std::string path = traces + "/" + a.preset + "-" + dataset + ".npy";
            save_trace(t, path);
            p.finish();
            return path;
        };
        std::cout << "grace demo: " << a.preset << ", " << a.tokens << " tokens per dataset (" << a.dataset << ", "
                  << a.other << "), topologies " << a.topology << ", hardware " << a.hardware << "\n";
        const std::string main_trace = generate(a.dataset);
        const std::string other_trace = generate(a.other);

        auto bars = std::make_shared<std::map<std::string, std::unique_ptr<Progress>>>();
        opt.progress = make_compare_progress(bars, "[1/3] ");
        const CompareResult same = run(main_trace, "");
        std::cout << format_compare_table(same);

        // Cross-dataset: plan on the other dataset, evaluate on the main one (paper Sec. 6.4), and the reverse.
        opt.progress = make_compare_progress(bars, "[2/3] ");
        const CompareResult cross = run(main_trace, other_trace);
        std::cout << "\nCross-dataset check: planned on " << a.other << ", evaluated on " << a.dataset << "\n"
                  << format_compare_table(cross);
        opt.progress = make_compare_progress(bars, "[3/3] ");
        const CompareResult other_same = run(other_trace, "");

        // Summary: how much of GRACE's in-distribution gain survives the dataset shift.
        std::cout << "\nGeneralization (end-to-end speedup of +DR+TAR over Occult):\n";
        for (const Topology& t : opt.topologies) {
            auto speed = [&](const CompareResult& r) {
                const auto* g = r.find("+DR+TAR", t);
                const auto* o = r.find("Occult", t);
                return g && o && g->report.total.end_to_end_s > 0
                           ? o->report.total.end_to_end_s / g->report.total.end_to_end_s
                           : 0.0;
            };
            std::printf("  %s: planned on %s %.2fx, planned on %s %.2fx (evaluated on %s)\n", t.to_string().c_str(),
                        a.dataset.c_str(), speed(same), a.other.c_str(), speed(cross), a.dataset.c_str());
        }
        const std::string report = (std::filesystem::path(tmp) / "report").string();
        std::filesystem::create_directory(report);
        write_report(
            {{"In-distribution: planned and evaluated on " + a.dataset,
              "The paper's component analysis (Table 1 rows, Occult to +DR+TAR) and the ecosystem baselines.", &same,
              true},
             {"Cross-dataset: planned on " + a.other + ", evaluated on " + a.dataset,
              "The paper's generalization test (Sec. 6.4): plans made from one dataset's statistics serve "
              "another dataset's tokens.",
              &cross, false},
             {"In-distribution on " + a.other, "The same comparison on the second dataset.", &other_same, false}},
            report, "GRACE demo: " + a.preset + " (" + a.dataset + ", " + a.other + ")");
        save_compare_plans(same, report);
    });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("\nwrote %s/report.html (and compare*.json, compare*.csv, fig0_*.svg) in %.1f s\n", report_dir.c_str(),
                secs);
    return 0;
}

GRACE_COMMAND(
    "demo", "The main job: generate traces, plan with every method, compare on 2x2 and 2x4, write the report",
    [](CLI::App& sub) -> std::function<int()> {
        auto a = std::make_shared<DemoArgs>();
        sub.add_option("-o,--output", a->output, "Output folder: new, empty, or an earlier grace demo output (replaced)")->capture_default_str();
        sub.add_option("--preset", a->preset, "Model preset")
            ->capture_default_str()
            ->check(parsed_by([](const std::string& name) { find_preset(name); }, "PRESET"));
        sub.add_option("--dataset", a->dataset, "Main dataset")
            ->capture_default_str()
            ->check(CLI::IsMember(generator_datasets()));
        sub.add_option("--other-dataset", a->other, "Second dataset (cross-dataset check)")
            ->capture_default_str()
            ->check(CLI::IsMember(generator_datasets()));
        sub.add_option("--tokens", a->tokens, "Tokens per trace")->capture_default_str()->check(integer_in<int64_t>(1));
        sub.add_option("--topology", a->topology, "Comma-separated NxM list")
            ->capture_default_str()
            ->check(topology_list());
        sub.add_option("--hardware", a->hardware, "Hardware preset or JSON file")
            ->capture_default_str()
            ->check(hardware_value());
        sub.add_option("--seed", a->seed, "Seed of the generator and the planner")
            ->capture_default_str()
            ->check(integer_in<uint64_t>(0));
        sub.add_option("--threads", a->threads, "Threads (0 = all)")->check(thread_count());
        return [a] { return run_demo(*a); };
    },
    5);

}  // namespace
}  // namespace grace::cli
