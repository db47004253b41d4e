// `grace run` in the `grace` executable: it hands its arguments, unparsed, to the `grace-run` executable that sits
// next to `grace` (tools/grace/run.cpp is built into that one). `run` is the only command that needs the MPI
// runtime and, in a CUDA build, the CUDA runtime, cuBLAS and NCCL; keeping them out of `grace` spares every other
// command their load time and memory. The exec keeps the process, its environment and its open files, so
// `mpirun -n 4 grace run ...` behaves as before.
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "command.hpp"
#include "grace/error.hpp"

namespace grace::cli {
namespace {

namespace fs = std::filesystem;

constexpr const char* kRunExecutable = "grace-run";

// The grace-run beside the running executable (/proc/self/exe resolves symlinks to grace).
fs::path run_executable_path() {
    std::error_code ec;
    fs::path self = fs::read_symlink("/proc/self/exe", ec);
    GRACE_CHECK(!ec, ErrorCode::kIo,
                "grace run: cannot locate the grace executable through /proc/self/exe: ", ec.message());
    return self.parent_path() / kRunExecutable;
}

[[noreturn]] void exec_run(const std::string& argv0, const std::vector<std::string>& args) {
    fs::path target = run_executable_path();
    // grace-run's own CLI has the single subcommand `run`; argv[0] stays the user's, so its usage line reads as theirs.
    std::vector<std::string> words{argv0, "run"};
    words.insert(words.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    ::execv(target.c_str(), argv.data());
    const int err = errno;  // execv returns only on failure
    throw Error(ErrorCode::kIo,
                cat("grace run needs the executable ", target.string(), " (built with grace): ", std::strerror(err)));
}

// The help text is run.cpp's, so `grace --help` lists `run` exactly as before.
GRACE_COMMAND(
    "run", "Replay a trace through a plan on the real MoE layer (MPI runtime); per-phase times and bytes",
    [](CLI::App& sub) -> std::function<int()> {
        // Parse nothing here: no --help of our own (grace-run prints the options), and every word after `run`,
        // known or not, goes through in order.
        sub.set_help_flag();
        sub.prefix_command();
        sub.allow_extras();
        return [&sub] {
            const CLI::App* root = &sub;
            while (root->get_parent()) root = root->get_parent();
            exec_run(root->get_name(), sub.remaining());
            return 1;
        };
    },
    60);

}  // namespace
}  // namespace grace::cli
