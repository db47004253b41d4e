#pragma once
/// @file grouping.hpp
/// Expert grouping (spec §3 and §8): partition one layer's E experts into n groups from its affinity matrix.
/// All functions take the affinity as a dense row-major [E, E] matrix (symmetric, zero diagonal) and return
/// a Grouping: group id per expert. Deterministic for a given seed, whatever the thread count.

#include <cstdint>
#include <optional>
#include <vector>

#include "grace/plan.hpp"

namespace grace {

/// group_of[e] in [0, n) for each expert e.
struct Grouping {
    int num_groups = 0;
    std::vector<int> group_of;  ///< [E]
    /// Sizes of the groups, [n].
    std::vector<int> sizes() const;
    /// Members of each group, ascending, [n][*].
    std::vector<std::vector<int>> members() const;
};

/// Equation 1: intra-group affinity utilization U in [0, 1] (1 if the matrix has no affinity at all).
double affinity_utilization(const std::vector<double>& affinity, int num_experts, const Grouping& grouping);
/// Equation 2: size deviation D = (max |g| - min |g|) / (E / n).
double size_deviation(const Grouping& grouping);

/// Options of spectral clustering (Ng-Jordan-Weiss, spec §3).
struct SpectralOptions {
    uint64_t seed = 0;        ///< k-means++ seeding
    int kmeans_restarts = 8;  ///< keep the lowest inertia
    int kmeans_max_iters = 100;
    double eps_scale = 1e-6;  ///< W = A + eps_scale * mean(A) off the diagonal
};

/// Fully non-uniform grouping: spectral clustering, sizes follow affinity alone. `min_size`/`max_size`
/// (optional) are hard bounds repaired afterwards with the controlled procedure (used by HG level 1 for
/// node capacity). Throws kInvalidArgument if n < 1, n > E, or the bounds are infeasible.
Grouping spectral_grouping(const std::vector<double>& affinity, int num_experts, int num_groups,
                           const SpectralOptions& options = {}, int min_size = 1, int max_size = 0);

/// Size bounds [lo, hi] of controlled non-uniform grouping with ratio r (spec §3); `cap` > 0 caps hi.
std::pair<int, int> controlled_bounds(int num_experts, int num_groups, double r, int cap = 0);

/// Repairs `start` so every group size lies in [lo, hi] by the moves of spec §3 (steps 1-2); with
/// `refine` also runs improving swaps/moves (step 3). Throws kInvalidArgument if n*lo > E or n*hi < E.
Grouping controlled_grouping(const std::vector<double>& affinity, int num_experts, const Grouping& start, int lo,
                             int hi, bool refine = false);

/// The knee search: evaluates r on the grid of values that change [lo, hi], from 0 (uniform) up to the
/// smallest r at which `fully_non_uniform` already fits. Returns the curve, r*, and the grouping at r*.
struct KneeResult {
    std::vector<KneePoint> curve;
    double r_star = 0;
    Grouping grouping;
};
/// Throws kInvalidArgument if the grid has a single point (nothing to choose) and `allow_single` is false.
KneeResult knee_grouping(const std::vector<double>& affinity, int num_experts, const Grouping& fully_non_uniform,
                         int cap = 0, bool refine = false, bool allow_single = true);

/// Occult (reconstruction): equal-size groups maximizing U: greedy agglomeration of the highest-affinity
/// pairs, then improving swaps. Needs n to divide E, else sizes differ by at most one.
Grouping occult_grouping(const std::vector<double>& affinity, int num_experts, int num_groups);
/// C2R placement (reconstruction): greedy pairing of the highest co-activation pairs into equal-size groups.
Grouping c2r_grouping(const std::vector<double>& affinity, int num_experts, int num_groups);
/// METIS k-way partition of the affinity graph with expert loads as vertex weights. `max_edges_per_vertex` > 0
/// keeps only each expert's heaviest edges (an edge stays when it is among the heaviest of either end, so the
/// graph stays symmetric): METIS's refinement time grows with the edges, and the affinity graph is dense.
Grouping metis_grouping(const std::vector<double>& affinity, const std::vector<double>& load, int num_experts,
                        int num_groups, uint64_t seed = 0, double imbalance = 1.03, int max_edges_per_vertex = 0);
/// True when grace was built with METIS (metis_grouping throws kUnsupported otherwise).
bool metis_available();
/// Vanilla: expert e in group floor(e * n / E).
Grouping vanilla_grouping(int num_experts, int num_groups);

}  // namespace grace
