#pragma once
/// @file error.hpp
/// One error type for the whole library, and the check macros that throw it.
///
/// Two kinds of failure (as in faiss): GRACE_CHECK for a caller's mistake (bad file, bad shape, bad
/// option) throws grace::Error with a message naming the bad value; GRACE_ASSERT for a broken internal
/// invariant throws grace::Error with ErrorCode::kInternal and the source location.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace grace {

/// What went wrong, coarsely; the message says precisely.
enum class ErrorCode {
    kInvalidArgument,  ///< an option or parameter is out of range or inconsistent
    kInvalidInput,     ///< an input file or array is malformed (truncated, wrong shape, bad ids)
    kIo,               ///< a file could not be opened, read, written or renamed
    kUnsupported,      ///< valid but not supported here (e.g. a backend that was not built)
    kBackend,          ///< MPI, CUDA or NCCL reported an error
    kInternal,         ///< a broken invariant: a bug in grace
};

/// The exception every grace function throws. `what()` is one line, without the "grace: error:" prefix.
class Error : public std::runtime_error {
  public:
    Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
    /// The category of the failure.
    ErrorCode code() const noexcept { return code_; }

  private:
    ErrorCode code_;
};

/// Concatenates its arguments with operator<< into one string.
template <typename... Args>
std::string cat(Args&&... args) {
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}

}  // namespace grace

/// Throws grace::Error(code, message) unless `cond` holds; the message parts are concatenated.
#define GRACE_CHECK(cond, code, ...)                                          \
    do {                                                                      \
        if (!(cond)) throw ::grace::Error((code), ::grace::cat(__VA_ARGS__)); \
    } while (0)

/// Shorthands for the common caller-mistake codes.
#define GRACE_CHECK_ARG(cond, ...) GRACE_CHECK(cond, ::grace::ErrorCode::kInvalidArgument, __VA_ARGS__)
#define GRACE_CHECK_INPUT(cond, ...) GRACE_CHECK(cond, ::grace::ErrorCode::kInvalidInput, __VA_ARGS__)

/// Internal invariant: a failure is a bug in grace, reported with its location.
#define GRACE_ASSERT(cond)                                                                                         \
    do {                                                                                                           \
        if (!(cond))                                                                                               \
            throw ::grace::Error(::grace::ErrorCode::kInternal,                                                    \
                                 ::grace::cat("internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__)); \
    } while (0)
