// The `grace` command-line tool. Every error reaches main as an exception and is printed as one line,
// `grace: error: ...`, with a non-zero exit.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <new>
#include <stdexcept>

#include "command.hpp"
#include "grace/error.hpp"

namespace grace::cli {

std::vector<Command>& registry() {
    static std::vector<Command> commands;
    return commands;
}

void add_trace_flags(CLI::App& sub, TraceOverrides& overrides, std::optional<int>& experts_flag) {
    sub.add_option("--experts", experts_flag, "Number of experts E (overrides the trace's metadata)")
        ->check(integer_in<int>(1));
    sub.add_option_function<std::string>(
        "--model", [&overrides](const std::string& v) { overrides.model = v; }, "Model name (overrides metadata)");
    sub.add_option_function<std::string>(
        "--dataset", [&overrides](const std::string& v) { overrides.dataset = v; },
        "Dataset name (overrides metadata)");
    sub.add_option_function<std::string>(
        "--weights", [&overrides](const std::string& v) { overrides.weights_path = v; },
        "Gate weights .npy [T, L, k] (overrides metadata; checked, not used)");
}

Progress::Progress(std::string label, int64_t total) : label_(std::move(label)), total_(std::max<int64_t>(total, 1)) {
    const char* env = std::getenv("GRACE_PROGRESS");
    enabled_ = env ? std::string(env) == "1" : isatty(STDERR_FILENO);
}

void Progress::update(int64_t done) {
    if (!enabled_) return;
    int percent = static_cast<int>(100 * std::min(done, total_) / total_);
    if (percent == last_percent_) return;
    last_percent_ = percent;
    int filled = percent * 30 / 100;
    std::fprintf(stderr, "\r%-28s [%s%s] %3d%%", label_.c_str(), std::string(filled, '#').c_str(),
                 std::string(30 - filled, '.').c_str(), percent);
    std::fflush(stderr);
}

void Progress::finish() {
    if (!enabled_) return;
    update(total_);
    std::fprintf(stderr, "\n");
}

}  // namespace grace::cli

int main(int argc, char** argv) {
    using namespace grace::cli;
    CLI::App app{"grace: expert grouping, replication and locality-aware routing for distributed MoE inference"};
    app.require_subcommand(1);
    app.set_version_flag("--version", "grace 0.1.0");
    auto& commands = registry();
    std::stable_sort(commands.begin(), commands.end(),
                     [](const Command& a, const Command& b) { return a.order < b.order; });
    // Only the command named on the line gets its options: building every command's took a third of the start-up
    // of `grace --version`. The top level takes flags alone, so the first word that is no option names it.
    const char* const* word = std::find_if(argv + 1, argv + argc, [](const char* w) { return w[0] != '-'; });
    const std::string chosen = word != argv + argc ? *word : "";
    std::function<int()> run;
    for (auto& command : commands) {
        CLI::App* sub = app.add_subcommand(command.name, command.help);
        if (command.name != chosen) continue;
        auto runner = command.setup(*sub);
        sub->callback([&run, runner] { run = runner; });
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::cerr << "grace: error: " << e.what() << "\n";
        return 2;
    }
    try {
        return run ? run() : 0;
    } catch (const std::bad_alloc&) {
        // Last resort: sizes that scale with an input are estimated before allocating (GRACE_MEMORY_LIMIT);
        // anything that still runs out of memory ends here as one line rather than a bare std::bad_alloc.
        std::cerr << "grace: error: out of memory: the input asks for more memory than is available "
                     "(check sizes such as --experts, the trace's shape and the topology)\n";
        return 1;
    } catch (const std::length_error& e) {
        std::cerr << "grace: error: a size derived from the input is too large to allocate (" << e.what() << ")\n";
        return 1;
    } catch (const std::exception& e) {
        std::cerr << "grace: error: " << e.what() << "\n";
        return 1;
    }
}
