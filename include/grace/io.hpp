#pragma once
/// @file io.hpp
/// Safe file output. Every file grace writes goes to a temporary beside its target (named
/// `.NAME.tmp.PID.N`, NAME being the target's file name) and is renamed into place only when complete, so a
/// failure never leaves a partial output. Files that belong together (a trace's ids, weights and metadata; a
/// report's .json and .csv) are committed together by an OutputSet. Folder outputs carry a marker file
/// (`.grace-output`) saying which kind of output they are, and grace only ever replaces a folder that is empty or
/// holds exactly the files its marker lists: it never deletes a file it did not write.
///
/// Errors are grace::Error with ErrorCode::kIo and name the TARGET and the cause, never the temporary, e.g.
/// `cannot write out/plan.json: No space left on device`.

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace grace {

/// File name of the marker every grace folder output carries: JSON
/// `{"format": "grace.output/v1", "kind": KIND, "files": [relative paths of the files grace wrote]}`.
inline constexpr const char* kOutputMarker = ".grace-output";

/// A new file written with POSIX calls so that every failure reports its errno (ENOSPC, EFBIG, EIO, ...) as
/// `cannot write TARGET: <strerror>`. `path` is where the bytes go (usually a temporary), `target` the name the
/// messages use. The destructor closes without checking; call close() to commit.
class OutputFile {
  public:
    /// Creates (or truncates) `path`. Throws kIo naming `target` if it cannot be opened.
    OutputFile(const std::string& path, const std::string& target);
    ~OutputFile();
    OutputFile(const OutputFile&) = delete;
    OutputFile& operator=(const OutputFile&) = delete;
    /// Writes all `size` bytes (retrying short writes). Throws kIo naming the target on failure.
    void write(const void* data, size_t size);
    /// Closes the file; a failed close (delayed write error) throws kIo naming the target.
    void close();

  private:
    int fd_ = -1;
    std::string target_;
};

/// Output files that belong together, committed together. add() writes each file to a temporary beside its
/// target; commit() checks that every temporary is complete and no target has become a folder, removes the
/// existing target of the LAST file added (the metadata that names the others), renames the other files into
/// place in the order added and renames the last file in last. An interrupted commit therefore never leaves old
/// metadata describing new data: either the new metadata is present and all its files are new, or there is no
/// metadata. Without commit() (an exception, a return) the destructor removes the temporaries, leaving every
/// target as it was. Before staging a target, stale temporaries of that target left by a killed grace run (same
/// name pattern, PID not alive) are removed.
class OutputSet {
  public:
    OutputSet() = default;
    ~OutputSet();
    OutputSet(const OutputSet&) = delete;
    OutputSet& operator=(const OutputSet&) = delete;

    /// Checks `path` (its folder exists, it is not a folder, not added before) and calls `write(tmp_path)` to
    /// produce the file's contents. Throws kIo (or whatever `write` throws); the set stays usable for cleanup.
    void add(const std::string& path, const std::function<void(const std::string& tmp_path)>& write);
    /// Stages `contents` as the file `path`.
    void add_text(const std::string& path, std::string_view contents);
    /// Renames every staged file into place (see the class comment). Throws kIo naming the target on failure.
    void commit();

  private:
    struct Staged {
        std::string target, tmp;
    };
    std::vector<Staged> staged_;
};

/// Calls `write(tmp_path)` to produce the file, then renames tmp_path to `path` (an OutputSet of one file). On any
/// exception the temporary is removed and the exception propagates. Throws kIo if `path`'s folder does not exist
/// or `path` is a folder.
void write_file_atomic(const std::string& path, const std::function<void(const std::string& tmp_path)>& write);

/// Writes `contents` to `path` atomically.
void write_text_atomic(const std::string& path, const std::string& contents);

/// Reads a whole text file; throws kIo naming the path if it cannot be read or is a folder.
std::string read_text(const std::string& path);

/// Throws kIo ("output folder does not exist: ...") unless the folder that would hold `path` exists.
void check_output_dir(const std::string& path);

/// Throws kIo unless `path` can be written as a file: its folder exists and `path` is not a folder.
void check_output_file(const std::string& path);

/// Throws kIo unless write_dir_atomic(dir, kind, ...) may replace `dir`: its parent folder exists and `dir` does
/// not exist, is an empty folder, or is a grace output of the same `kind` holding only the files its marker
/// lists. Commands call it before long work so that a wrong -o fails at once. The refusal is one line, e.g.
/// `refusing to replace folder X: it is not a grace stats output (no .grace-output marker); choose another -o or
/// remove it`.
void check_output_folder(const std::string& dir, const std::string& kind);

/// Creates a folder output atomically: `fill(tmp_dir)` writes into a fresh temporary folder beside `dir`; the
/// marker (kind `kind`, listing every file `fill` wrote) is added, then the folder replaces `dir`: an existing
/// `dir` must pass check_output_folder; it is renamed aside, the new folder renamed in, and only then are the old
/// folder's marker-listed files removed (anything else found there stays, in the hidden `.DIR.tmp.PID.N.old`).
/// Errors from `fill` that name the temporary folder are rethrown naming `dir` instead.
void write_dir_atomic(const std::string& dir, const std::string& kind,
                      const std::function<void(const std::string& tmp_dir)>& fill);

/// Removes the temporaries of `target` (files or folders named `.NAME.tmp.PID.N` or `.NAME.tmp.PID.N.old` beside
/// it) whose PID is not a live process. Nothing else is touched; an `.old` folder loses only the files its marker
/// lists (the rest stays there). Returns how many stale temporaries it found. Called by every writer before it
/// stages `target`.
int remove_stale_temporaries(const std::string& target);

}  // namespace grace
