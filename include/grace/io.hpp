#pragma once
/// @file io.hpp
/// Atomic file output: every file grace writes goes to a temporary name in the target folder first and is
/// renamed into place only when complete, so a failure never leaves a partial output.

#include <functional>
#include <string>

namespace grace {

/// Calls `write(tmp_path)` to produce the file, then renames tmp_path to `path`. On any exception the
/// temporary is removed and the exception propagates. Throws kIo if `path`'s folder does not exist.
void write_file_atomic(const std::string& path, const std::function<void(const std::string& tmp_path)>& write);

/// Writes `contents` to `path` atomically.
void write_text_atomic(const std::string& path, const std::string& contents);

/// Reads a whole text file; throws kIo naming the path if it cannot be read.
std::string read_text(const std::string& path);

/// Throws kIo ("output folder does not exist: ...") unless the folder that would hold `path` exists.
void check_output_dir(const std::string& path);

/// Creates a directory output atomically: `fill(tmp_dir)` writes into a fresh temporary folder beside
/// `dir`, which then replaces `dir` (an existing `dir` is removed only after `fill` succeeded).
void write_dir_atomic(const std::string& dir, const std::function<void(const std::string& tmp_dir)>& fill);

}  // namespace grace
