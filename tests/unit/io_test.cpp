// Safe output (grace/io.hpp): write errors name the target and the cause, outputs that belong together appear
// together, folder outputs never replace what grace did not write, and temporaries of killed runs are cleaned.
#include "grace/io.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "grace/eval.hpp"
#include "grace/npy.hpp"
#include "grace/plan.hpp"
#include "grace/trace.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace grace {
namespace {

using testing::error_of;
using testing::read_bytes;
using testing::TempDir;
using testing::write_bytes;

/// Names in `dir` (not recursive), sorted.
std::vector<std::string> names_in(const fs::path& dir) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
}

/// The PID of a process that has exited and been reaped (so no process has it, barring reuse right away).
long dead_pid() {
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    int status = 0;
    ::waitpid(child, &status, 0);
    return child;
}

/// Lowers the file-size limit for the scope so that a write past `bytes` fails with EFBIG (SIGXFSZ ignored).
class FileSizeLimit {
  public:
    explicit FileSizeLimit(rlim_t bytes) {
        ::getrlimit(RLIMIT_FSIZE, &saved_);
        old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
        rlimit lim = saved_;
        lim.rlim_cur = bytes;
        ::setrlimit(RLIMIT_FSIZE, &lim);
    }
    ~FileSizeLimit() {
        ::setrlimit(RLIMIT_FSIZE, &saved_);
        ::signal(SIGXFSZ, old_handler_);
    }

  private:
    rlimit saved_{};
    sighandler_t old_handler_ = nullptr;
};

RoutingTrace tiny_trace() {
    RoutingTrace t;
    t.num_experts = 4;
    t.num_layers = 1;
    t.top_k = 2;
    t.num_tokens = 3;
    t.expert_ids = {0, 1, 2, 3, 1, 2};
    t.gate_weights = {0.5, 0.5, 0.6, 0.4, 0.7, 0.3};
    return t;
}

TEST(OutputFile, DiskFullNamesTargetAndCause) {
    // /dev/full fails every write with ENOSPC: the message names the target, not where the bytes were going.
    if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
    OutputFile f("/dev/full", "out/plan.json");
    const std::string data(4096, 'x');
    EXPECT_EQ(error_of([&] { f.write(data.data(), data.size()); }),
              "cannot write out/plan.json: No space left on device");
}

TEST(OutputFile, OpenFailureNamesTarget) {
    TempDir dir;
    EXPECT_EQ(error_of([&] { OutputFile f(dir.file("missing/x.tmp"), "out/x.json"); }),
              "cannot write out/x.json: No such file or directory");
}

// A folder given where a text file (a plan, a hardware file) is read says so; it read as empty and then failed
// as "not valid JSON".
TEST(ReadText, FolderSaysItIsAFolder) {
    TempDir dir;
    std::filesystem::create_directory(dir.file("plans"));
    EXPECT_EQ(error_of([&] { read_text(dir.file("plans")); }), dir.file("plans") + ": is a folder, not a file");
    EXPECT_NE(error_of([&] { load_plan(dir.file("plans")); }).find("is a folder"), std::string::npos);
}

TEST(OutputSet, FileTooLargeNamesTargetAndLeavesNothing) {
    TempDir dir;
    const std::string big(1 << 16, 'x');
    std::string err;
    {
        FileSizeLimit limit(1024);
        err = error_of([&] { write_text_atomic(dir.file("plan.json"), big); });
    }
    EXPECT_EQ(err, "cannot write " + dir.file("plan.json") + ": File too large");
    EXPECT_TRUE(names_in(dir.path()).empty());
}

TEST(OutputSet, NestedAtomicWriteErrorNamesTarget) {
    // write_npy into a staged temporary is itself atomic; its failure must still name the set's target.
    TempDir dir;
    std::string err;
    {
        FileSizeLimit limit(1024);
        err = error_of([&] {
            OutputSet set;
            set.add(dir.file("ids.npy"),
                    [&](const std::string& tmp) { write_npy(tmp, std::vector<int64_t>(4096, 7), {4096}); });
        });
    }
    EXPECT_EQ(err, "cannot write " + dir.file("ids.npy") + ": File too large");
    EXPECT_TRUE(names_in(dir.path()).empty());
}

TEST(OutputSet, InjectedErrorNamingTheTemporaryIsRewrittenToTheTarget) {
    TempDir dir;
    const std::string err = error_of([&] {
        OutputSet set;
        set.add(dir.file("a.json"), [](const std::string& tmp) {
            throw Error(ErrorCode::kIo, "cannot write " + tmp + ": No space left on device");
        });
    });
    EXPECT_EQ(err, "cannot write " + dir.file("a.json") + ": No space left on device");
    EXPECT_TRUE(names_in(dir.path()).empty());
}

TEST(OutputSet, NothingAppearsUntilCommitAndAllAppearTogether) {
    TempDir dir;
    write_bytes(dir.file("r.json"), "old json");
    write_bytes(dir.file("r.csv"), "old csv");
    {
        OutputSet set;
        set.add_text(dir.file("r.csv"), "new csv");
        set.add_text(dir.file("r.json"), "new json");
        EXPECT_EQ(read_bytes(dir.file("r.json")), "old json");
        EXPECT_EQ(read_bytes(dir.file("r.csv")), "old csv");
        set.commit();
    }
    EXPECT_EQ(read_bytes(dir.file("r.json")), "new json");
    EXPECT_EQ(read_bytes(dir.file("r.csv")), "new csv");
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"r.csv", "r.json"}));
}

TEST(OutputSet, UncommittedSetLeavesTargetsAndNoTemporaries) {
    TempDir dir;
    write_bytes(dir.file("r.json"), "old json");
    {
        OutputSet set;
        set.add_text(dir.file("r.csv"), "new csv");
        set.add_text(dir.file("r.json"), "new json");
    }
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"r.json"}));
    EXPECT_EQ(read_bytes(dir.file("r.json")), "old json");
}

TEST(OutputSet, ChecksEveryTargetBeforeRenamingAny) {
    TempDir dir;
    write_bytes(dir.file("meta.json"), "old meta");
    OutputSet set;
    set.add_text(dir.file("data.npy"), "new data");
    set.add_text(dir.file("meta.json"), "new meta");
    fs::create_directory(dir.file("data.npy"));  // the target became a folder after staging
    EXPECT_NE(error_of([&] { set.commit(); }).find("output path is a folder: " + dir.file("data.npy")),
              std::string::npos);
    EXPECT_EQ(read_bytes(dir.file("meta.json")), "old meta");  // nothing was renamed, the old metadata stays
}

TEST(OutputSet, RefusesAFolderTargetAndTheSameTargetTwice) {
    TempDir dir;
    fs::create_directory(dir.file("t.npy"));
    OutputSet set;
    set.add_text(dir.file("a.txt"), "a");
    EXPECT_EQ(error_of([&] { set.add_text(dir.file("t.npy"), "x"); }), "output path is a folder: " + dir.file("t.npy"));
    EXPECT_EQ(error_of([&] { set.add_text(dir.file("a.txt"), "again"); }),
              "cannot write " + dir.file("a.txt") + ": the same output is written twice");
}

TEST(SaveTrace, FolderTargetLeavesNoNewFiles) {
    TempDir dir;
    fs::create_directory(dir.file("t.npy"));
    EXPECT_NE(error_of([&] { save_trace(tiny_trace(), dir.file("t.npy")); }).find("output path is a folder"),
              std::string::npos);
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"t.npy"}));
}

TEST(SaveTrace, RewriteReplacesIdsWeightsAndMetadataTogether) {
    TempDir dir;
    save_trace(tiny_trace(), dir.file("t.npy"));
    RoutingTrace t2 = tiny_trace();
    t2.expert_ids = {3, 2, 1, 0, 0, 3};
    t2.gate_weights = {0.9, 0.1, 0.8, 0.2, 0.5, 0.5};
    save_trace(t2, dir.file("t.npy"));
    const RoutingTrace back = load_trace(dir.file("t.npy"));
    EXPECT_EQ(back.expert_ids, t2.expert_ids);
    ASSERT_EQ(back.gate_weights.size(), 6u);
    EXPECT_FLOAT_EQ(static_cast<float>(back.gate_weights[0]), 0.9f);
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"t.json", "t.npy", "t.weights.npy"}));
}

TEST(SaveReport, JsonAndCsvAppearTogetherOrNotAtAll) {
    TempDir dir;
    EvalReport r;
    fs::create_directory(dir.file("r.json"));  // the .json cannot be written: the .csv must not appear either
    EXPECT_NE(error_of([&] { save_report(r, dir.file("r")); }).find("output path is a folder"), std::string::npos);
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"r.json"}));
    fs::remove(dir.file("r.json"));
    save_report(r, dir.file("r"));
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"r.csv", "r.json"}));
}

TEST(WriteDirAtomic, RefusesAFolderGraceDidNotWrite) {
    TempDir dir;
    fs::create_directory(dir.file("work"));
    write_bytes(dir.file("work/trace.npy"), "user data");
    bool filled = false;
    const std::string err =
        error_of([&] { write_dir_atomic(dir.file("work"), "stats", [&](const std::string&) { filled = true; }); });
    EXPECT_EQ(err, "refusing to replace folder " + dir.file("work") +
                       ": it is not a grace stats output (no .grace-output marker); choose another -o or remove it");
    EXPECT_FALSE(filled);
    EXPECT_EQ(read_bytes(dir.file("work/trace.npy")), "user data");
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"work"}));
}

TEST(WriteDirAtomic, WritesMarkerAndReplacesItsOwnOutput) {
    TempDir dir;
    const std::string out = dir.file("s") + "/";  // a trailing slash names the same folder
    write_dir_atomic(out, "stats", [](const std::string& tmp) {
        write_text_atomic(tmp + "/a.txt", "1");
        fs::create_directory(tmp + "/sub");
        write_text_atomic(tmp + "/sub/b.txt", "2");
    });
    const auto marker = nlohmann::json::parse(read_bytes(dir.file("s/.grace-output")));
    EXPECT_EQ(marker["format"], "grace.output/v1");
    EXPECT_EQ(marker["kind"], "stats");
    EXPECT_EQ(marker["files"], nlohmann::json({"a.txt", "sub/b.txt"}));
    // Again into its own output: replaced whole (b.txt was grace's, so it goes).
    write_dir_atomic(out, "stats", [](const std::string& tmp) { write_text_atomic(tmp + "/a.txt", "3"); });
    EXPECT_EQ(read_bytes(dir.file("s/a.txt")), "3");
    EXPECT_FALSE(fs::exists(dir.file("s/sub")));
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"s"}));  // no temporaries, no old folder
}

TEST(WriteDirAtomic, EmptyFolderIsReplaced) {
    TempDir dir;
    fs::create_directory(dir.file("e"));
    write_dir_atomic(dir.file("e"), "compare", [](const std::string& tmp) { write_text_atomic(tmp + "/x", "x"); });
    EXPECT_EQ(names_in(dir.file("e")), (std::vector<std::string>{".grace-output", "x"}));
}

TEST(WriteDirAtomic, RefusesOwnOutputHoldingAUserFileOrOfAnotherKind) {
    TempDir dir;
    write_dir_atomic(dir.file("s"), "stats", [](const std::string& tmp) { write_text_atomic(tmp + "/a", "1"); });
    EXPECT_EQ(error_of([&] { write_dir_atomic(dir.file("s"), "compare", [](const std::string&) {}); }),
              "refusing to replace folder " + dir.file("s") +
                  ": it is a grace stats output, not a compare output; choose another -o or remove it");
    write_bytes(dir.file("s/notes.txt"), "mine");
    EXPECT_EQ(error_of([&] { write_dir_atomic(dir.file("s"), "stats", [](const std::string&) {}); }),
              "refusing to replace folder " + dir.file("s") +
                  ": it holds notes.txt, which grace did not write; choose another -o or remove it");
    EXPECT_EQ(read_bytes(dir.file("s/notes.txt")), "mine");
    write_bytes(dir.file("f"), "a file");
    EXPECT_NE(error_of([&] {
                  write_dir_atomic(dir.file("f"), "stats", [](const std::string&) {});
              }).find("it exists and is not a folder"),
              std::string::npos);
}

TEST(WriteDirAtomic, FillErrorNamesTheFolderAndLeavesNothing) {
    TempDir dir;
    const std::string err = error_of([&] {
        write_dir_atomic(dir.file("s"), "stats", [](const std::string& tmp) {
            write_text_atomic(tmp + "/a", "1");
            throw Error(ErrorCode::kIo, "cannot write " + tmp + "/b.npy: No space left on device");
        });
    });
    EXPECT_EQ(err, "cannot write " + dir.file("s") + "/b.npy: No space left on device");
    EXPECT_TRUE(names_in(dir.path()).empty());
}

TEST(StaleTemporaries, OnlyDeadGraceTemporariesOfTheTargetAreRemoved) {
    TempDir dir;
    const std::string dead = std::to_string(dead_pid());
    const std::string alive = std::to_string(::getpid());
    write_bytes(dir.file(".t.npy.tmp." + dead + ".0"), "half-written ids");
    write_bytes(dir.file("..t.npy.tmp." + dead + ".0.tmp." + dead + ".1"), "nested");  // write_npy's own temporary
    write_bytes(dir.file(".t.npy.tmp." + alive + ".7"), "a live writer's");
    fs::create_directory(dir.file(".t.npy.tmp." + dead + ".5"));  // a folder output a killed run was filling
    write_bytes(dir.file(".t.npy.tmp." + dead + ".5/affinity.npy"), "partial");
    write_bytes(dir.file(".t.npy.tmp.x.0"), "not grace's pattern");
    write_bytes(dir.file(".u.npy.tmp." + dead + ".0"), "another target's");
    write_bytes(dir.file("t.npy"), "the user's trace");
    // A replaced output set aside by a killed run: only its marker-listed files go.
    const std::string old = dir.file(".t.npy.tmp." + dead + ".2.old");
    fs::create_directory(old);
    write_bytes(old + "/a.npy", "grace's");
    write_bytes(old + "/user.txt", "added by the user");
    write_bytes(old + "/.grace-output", R"({"format": "grace.output/v1", "kind": "stats", "files": ["a.npy"]})");

    EXPECT_EQ(remove_stale_temporaries(dir.file("t.npy")), 4);
    std::vector<std::string> kept = {".t.npy.tmp." + dead + ".2.old", ".t.npy.tmp." + alive + ".7", ".t.npy.tmp.x.0",
                                     ".u.npy.tmp." + dead + ".0", "t.npy"};
    std::sort(kept.begin(), kept.end());
    EXPECT_EQ(names_in(dir.path()), kept);
    EXPECT_EQ(names_in(old), (std::vector<std::string>{".grace-output", "user.txt"}));
}

TEST(StaleTemporaries, NextWriterOfTheTargetCleansThem) {
    TempDir dir;
    const std::string stale = dir.file(".t.npy.tmp." + std::to_string(dead_pid()) + ".0");
    write_bytes(stale, std::string(1000, 'x'));
    save_trace(tiny_trace(), dir.file("t.npy"));
    EXPECT_FALSE(fs::exists(stale));
    EXPECT_EQ(names_in(dir.path()), (std::vector<std::string>{"t.json", "t.npy", "t.weights.npy"}));
}

}  // namespace
}  // namespace grace
