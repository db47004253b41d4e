#pragma once
// Subcommand registry: each tools/grace/<name>.cpp registers itself with GRACE_COMMAND, so adding a command
// touches no other file. main.cpp builds the CLI11 app from the registry.

#include <CLI/CLI.hpp>
#include <charconv>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "grace/topology.hpp"
#include "grace/trace.hpp"

namespace grace::cli {

/// A subcommand: `setup` adds its options to `sub` and returns the function that runs it.
struct Command {
    std::string name;
    std::string help;
    std::function<std::function<int()>(CLI::App& sub)> setup;
    int order = 100;  ///< position in --help
};

std::vector<Command>& registry();

struct Registrar {
    explicit Registrar(Command c) { registry().push_back(std::move(c)); }
};

/// Adds --experts, --model, --dataset, --weights to a command taking a trace; returns the overrides to fill.
void add_trace_flags(CLI::App& sub, TraceOverrides& overrides, std::optional<int>& experts_flag);

/// Largest --threads any command accepts: more would only oversubscribe, and OpenMP aborts (instead of failing)
/// when it cannot create the threads.
constexpr int kMaxThreads = 1024;

/// Option validators: each rejects a bad value at parse time, so the error names the option and the value
/// (`grace: error: --threads: must be an integer in [0, 1024], got '-1'`) before any file is read or written.

/// A decimal integer of type T in [lo, hi]. Stricter than CLI11's own conversion, which wraps "-1" into an
/// unsigned option and saturates a value past the type's range.
template <typename T>
CLI::Validator integer_in(T lo, T hi = std::numeric_limits<T>::max()) {
    const std::string range = hi == std::numeric_limits<T>::max()
                                  ? ">= " + std::to_string(lo)
                                  : "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    return CLI::Validator(
        [lo, hi, range](std::string& text) -> std::string {
            T value{};
            const char* end = text.data() + text.size();
            const auto [stop, ec] = std::from_chars(text.data(), end, value);
            if (ec == std::errc() && stop == end && value >= lo && value <= hi) return {};
            // A whole number too large for the option's type: say so, not just the lower bound.
            if (ec == std::errc::result_out_of_range && stop == end && hi == std::numeric_limits<T>::max())
                return "must be an integer " + range + " and at most " + std::to_string(hi) + ", got '" + text + "'";
            return "must be an integer " + range + ", got '" + text + "'";
        },
        // Shown in --help after the type, e.g. `INT:POSITIVE=65536`, `INT:[0, 1024]`.
        hi != std::numeric_limits<T>::max() ? range.substr(3)
        : lo == 0                           ? "NONNEGATIVE"
        : lo == 1                           ? "POSITIVE"
                                            : range);
}
/// --threads: 0 (= all) to kMaxThreads.
CLI::Validator thread_count();
/// --adapt-decay: a number in [0, 1) (AdaptationOptions::decay), checked at parse time.
CLI::Validator adapt_decay_value();
/// A value accepted by `parse` (any function that throws on a bad value, e.g. parse_comm_scheme); the error is
/// the exception's message.
CLI::Validator parsed_by(std::function<void(const std::string&)> parse, std::string description);
/// A hardware preset name or grace.hardware/v1 file (load_hardware).
CLI::Validator hardware_value();
/// One topology NxM (Topology::parse).
CLI::Validator topology_value();
/// A comma-separated list of topologies (parse_topologies).
CLI::Validator topology_list();

/// Parses a comma-separated NxM list; throws kInvalidArgument for an empty list or a bad entry.
std::vector<Topology> parse_topologies(const std::string& text);

/// Prints to stderr (for progress) only when it is a terminal or GRACE_PROGRESS=1.
class Progress {
  public:
    Progress(std::string label, int64_t total);
    void update(int64_t done);
    void finish();

  private:
    std::string label_;
    int64_t total_;
    bool enabled_;
    int last_percent_ = -1;
};

}  // namespace grace::cli

#define GRACE_CLI_CONCAT2(a, b) a##b
#define GRACE_CLI_CONCAT(a, b) GRACE_CLI_CONCAT2(a, b)
/// Registers a subcommand at static-initialization time.
#define GRACE_COMMAND(...) \
    static ::grace::cli::Registrar GRACE_CLI_CONCAT(grace_cmd_, __LINE__)(::grace::cli::Command{__VA_ARGS__})
