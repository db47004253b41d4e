// `grace gen`: writes a synthetic trace (spec §10) with its metadata and gate weights.
#include <chrono>
#include <cstdio>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/generator.hpp"
#include "grace/io.hpp"

namespace grace::cli {
namespace {

std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
}

std::function<int()> setup_gen(CLI::App& sub) {
    auto opts = std::make_shared<GeneratorOptions>();
    auto out = std::make_shared<std::string>();
    auto no_weights = std::make_shared<bool>(false);
    std::vector<std::string> presets;
    for (const auto& p : model_presets()) presets.push_back(p.name);
    sub.add_option("--preset", opts->preset, "Model preset: " + joined(presets))
        ->capture_default_str()
        ->check(parsed_by([](const std::string& name) { find_preset(name); }, "PRESET"));
    sub.add_option("--dataset", opts->dataset, "Dataset: " + joined(generator_datasets()))
        ->capture_default_str()
        ->check(CLI::IsMember(generator_datasets()));
    sub.add_option("--tokens", opts->num_tokens, "Number of tokens T")
        ->capture_default_str()
        ->check(integer_in<int64_t>(1));
    sub.add_option("--seed", opts->seed, "Random seed")->capture_default_str()->check(integer_in<uint64_t>(0));
    sub.add_option("--layers", opts->num_layers, "MoE layers (0 = the preset's)")
        ->capture_default_str()
        ->check(integer_in<int>(0));
    sub.add_option("--seq-len", opts->sequence_length, "Tokens per sequence (topic burstiness)")
        ->capture_default_str()
        ->check(integer_in<int>(1));
    sub.add_option("--threads", opts->num_threads, "Threads (0 = all; output is the same for any count)")
        ->capture_default_str()
        ->check(thread_count());
    sub.add_option("--shift", opts->domain_shift,
                   "Domain shift between datasets in [0, 1]: weight of the dataset-specific popularity and topic "
                   "mixture (default: the preset's)")
        ->check(CLI::Validator(
            [](std::string& v) -> std::string {
                double x = 0;
                if (!CLI::detail::lexical_cast(v, x) || !(x >= 0.0 && x <= 1.0))  // also refuses nan
                    return "domain shift must be a number in [0, 1], got '" + v + "'";
                return {};
            },
            "SHIFT in [0, 1]"));
    sub.add_flag("--no-weights", *no_weights, "Do not write gate weights");
    sub.add_option("-o,--output", *out, "Output trace TRACE.npy (TRACE.json and TRACE.weights.npy beside it)")
        ->required();
    return [opts, out, no_weights] {
        opts->with_weights = !*no_weights;
        // Check all three targets before generating: a bad one fails at once and nothing is written.
        const std::string meta = trace_metadata_path(*out);
        check_output_file(*out);
        check_output_file(meta);
        if (opts->with_weights) check_output_file(meta.substr(0, meta.size() - 5) + ".weights.npy");
        auto t0 = std::chrono::steady_clock::now();
        RoutingTrace trace = generate_trace(*opts);
        auto t1 = std::chrono::steady_clock::now();
        save_trace(trace, *out);
        auto t2 = std::chrono::steady_clock::now();
        std::printf("generated %s/%s: T=%lld L=%d k=%d E=%d in %.2f s, wrote %s in %.2f s\n", trace.model.c_str(),
                    trace.dataset.c_str(), static_cast<long long>(trace.num_tokens), trace.num_layers, trace.top_k,
                    trace.num_experts, std::chrono::duration<double>(t1 - t0).count(), out->c_str(),
                    std::chrono::duration<double>(t2 - t1).count());
        return 0;
    };
}

GRACE_COMMAND("gen", "Generate a synthetic routing trace at a model preset's shape", setup_gen, 10);

}  // namespace
}  // namespace grace::cli
