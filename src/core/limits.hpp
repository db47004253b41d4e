#pragma once
// Bounds on the work one input number can ask for (internal): checked products for sizes derived from inputs,
// and a memory estimate checked before an allocation that scales with an input number, so that a huge value
// fails with one line naming the need and the limit instead of running out of memory.

#include <cstdint>
#include <initializer_list>
#include <string>

namespace grace::detail {

/// Product of non-negative `factors`; throws kInvalidInput "<what>: <a> x <b> x ... overflows int64" when the
/// product does not fit in int64.
int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what);

/// Bytes grace may allocate for one structure: GRACE_MEMORY_LIMIT if set (bytes, or a number with a K/M/G/T
/// suffix, binary units), else the machine's physical memory. `source` receives where the limit came from.
/// Throws kInvalidArgument for a malformed GRACE_MEMORY_LIMIT.
double memory_limit(std::string* source = nullptr);

/// "3.5 TiB", "512.0 MiB", "96 B".
std::string format_bytes(double bytes);

/// Throws kInvalidArgument "<what> needs <need> (limit: <limit>, <source>)" when `bytes` exceeds memory_limit().
/// `what` says who needs it, e.g. "profile: E = 100000 experts (--experts) over 48 layers".
void check_memory(double bytes, const std::string& what);

}  // namespace grace::detail
