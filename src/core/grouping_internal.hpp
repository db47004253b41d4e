#pragma once
/// @file grouping_internal.hpp
/// Helpers shared by the grouping sources (not part of the public API).

#include <cstdint>
#include <vector>

#include "grace/grouping.hpp"

namespace grace::detail {

/// Checks shape and values of a public affinity argument and returns its clean form: symmetric
/// (A + A^T)/2, zero diagonal (C2R-style data marks the diagonal with -1). Throws kInvalidArgument.
std::vector<double> clean_affinity(const std::vector<double>& affinity, int num_experts, const char* fn);
/// Throws kInvalidArgument unless 1 <= n <= E.
void check_num_groups(int num_experts, int num_groups, const char* fn);
/// Relabels groups by their smallest member (the group of expert 0 is 0, ...); empty groups last.
Grouping canonical(const Grouping& g);

/// A grouping with its sizes and the intra-affinity table a(e, g) = sum_{j in g, j != e} A_ej kept current
/// under moves, so a move costs O(E) rather than a recomputation.
class GroupState {
  public:
    GroupState(const double* a, int num_experts, const Grouping& start);
    int group(int e) const { return group_of_[e]; }
    int size(int g) const { return size_[g]; }
    double aff(int e, int g) const { return aff_[static_cast<size_t>(g) * e_ + e]; }
    int num_groups() const { return n_; }
    int num_experts() const { return e_; }
    void move(int e, int to);
    /// Sum of A over intra-group pairs i < j, in O(E).
    double intra_sum() const;
    Grouping grouping() const;

  private:
    const double* a_;
    int e_, n_;
    std::vector<int> group_of_, size_;
    std::vector<double> aff_;  // [n, E]: a move updates two contiguous rows
};

/// Steps 1-2 of controlled grouping (spec §3) on a clean matrix; the state ends with sizes in [lo, hi].
void repair_sizes(GroupState& st, int lo, int hi);
/// Step 3: improving moves and swaps (Kernighan-Lin style, first improvement per expert, best partner),
/// keeping sizes in [lo, hi], until none raises U.
void refine_groups(const double* a, int num_experts, GroupState& st, int lo, int hi);

/// splitmix64: a tiny fixed PRNG with identical output on every platform and standard library.
struct SplitMix64 {
    uint64_t state;
    explicit SplitMix64(uint64_t seed) : state(seed) {}
    uint64_t next() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    /// Uniform in [0, 1) with 53 random bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

/// Eigensolver of spectral grouping (spectral.cpp). kAuto picks by size (dense below E = 64 or when more than
/// E / 8 eigenvectors are needed, Lanczos otherwise); kLanczos falls back to kDense if Lanczos does not converge.
enum class EigenSolver { kAuto, kDense, kLanczos };

/// Eigenvectors of the `k` largest eigenvalues of the symmetric E x E matrix `m` (row-major, 1 <= k < E), as
/// [E, k] row-major, columns in descending eigenvalue order; each column has unit norm, sign unspecified.
std::vector<double> top_eigenvectors(const std::vector<double>& m, int num_experts, int k, EigenSolver solver);

/// spectral_grouping (grace/grouping.hpp) with a chosen eigensolver; the public function uses kAuto.
Grouping spectral_grouping(const std::vector<double>& affinity, int num_experts, int num_groups,
                           const SpectralOptions& options, int min_size, int max_size, EigenSolver solver);

}  // namespace grace::detail
