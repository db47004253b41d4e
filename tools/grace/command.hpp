#pragma once
// Subcommand registry: each tools/grace/<name>.cpp registers itself with GRACE_COMMAND, so adding a command
// touches no other file. main.cpp builds the CLI11 app from the registry.

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

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
