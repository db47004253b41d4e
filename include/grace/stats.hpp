#pragma once
/// @file stats.hpp
/// Routing statistics (spec §2) and the profiler that computes them from a trace.
///
/// Per layer l: load l_i = tokens whose top-k contains i (sum_i = T*k); affinity A_ij (i != j) = tokens whose
/// top-k contains both i and j, symmetric, A_ii = 0. Optionally per-source-GPU loads l_{s,i} for a topology
/// (token t's source GPU is home_gpu(t, T, G)).
///
/// On disk, statistics are a folder (documented in docs/formats.md):
///   meta.json          {"format": "grace.stats/v1", "num_layers", "num_experts", "top_k", "num_tokens",
///                       "model", "dataset", "num_gpus" (0 if no source loads)}
///   affinity.npy       int64 [L, E, E]   (unordered pairs: A, not 2A)
///   load.npy           int64 [L, E]
///   source_load.npy    int64 [L, G, E]   (only when num_gpus > 0)
///   window_load.npy    int64 [L, W, E]   (only when window_tokens > 0: loads in each window of the trace(s))
///   window_tokens.npy  int64 [W]         (tokens in each window)
///   window_weight.npy  float64 [W]       (weight of one token of each window in the mix; 1 unless re-weighted)
/// meta.json also records the traces that were merged ("sources") and the window size ("window_tokens").

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "grace/topology.hpp"
#include "grace/trace.hpp"

namespace grace {

/// One trace merged into a statistics folder (meta.json "sources").
struct StatsSource {
    std::string trace;       ///< the trace's path, as given
    std::string dataset;     ///< its dataset name
    int64_t num_tokens = 0;  ///< T_d
    double weight = 0;       ///< w_d as given to --mix, or T_d when the mix is weighted by token count
    double scale = 1;        ///< factor on each of its counts: (w_d / sum w) * T / T_d (1 for a plain concatenation)
};

/// Profiled or imported statistics for all layers.
struct RoutingStats {
    int num_layers = 0;      ///< L
    int num_experts = 0;     ///< E
    int top_k = 0;           ///< k (0 if unknown, e.g. imported loads without k)
    int64_t num_tokens = 0;  ///< T (0 if unknown)
    std::string model, dataset;
    std::vector<int64_t> affinity;     ///< [L, E, E], symmetric, zero diagonal
    std::vector<int64_t> load;         ///< [L, E]
    int num_gpus = 0;                  ///< G of source_load, 0 if absent
    std::vector<int64_t> source_load;  ///< [L, G, E] or empty
    std::vector<StatsSource> sources;  ///< traces these statistics come from (empty: not recorded)
    /// Per-window loads (grace profile --window-tokens): windows of `window_tokens` consecutive tokens of one
    /// trace (a trace's last window may be shorter; no window spans two traces), in trace order.
    int64_t window_tokens = 0;           ///< window size; 0 = no per-window loads
    std::vector<int64_t> window_load;    ///< [L, num_windows(), E] raw counts (not scaled)
    std::vector<int64_t> window_counts;  ///< [num_windows()] tokens in each window
    std::vector<double> window_weight;   ///< [num_windows()] mix scale of the window's trace

    int num_windows() const { return static_cast<int>(window_counts.size()); }
    int64_t affinity_at(int l, int i, int j) const {
        return affinity[(static_cast<int64_t>(l) * num_experts + i) * num_experts + j];
    }
    int64_t load_at(int l, int i) const { return load[static_cast<int64_t>(l) * num_experts + i]; }
    /// Pointer to layer l's [E, E] affinity block.
    const int64_t* layer_affinity(int l) const {
        return affinity.data() + static_cast<int64_t>(l) * num_experts * num_experts;
    }
    /// Pointer to layer l's [E] loads.
    const int64_t* layer_load(int l) const { return load.data() + static_cast<int64_t>(l) * num_experts; }
    /// Throws kInvalidInput unless shapes agree, A is symmetric with a zero diagonal and nothing is negative.
    void validate() const;
};

/// Options of the profiler.
struct ProfileOptions {
    int num_threads = 0;               ///< 0 = all hardware threads; results are identical for any count
    std::optional<Topology> topology;  ///< if set, also count per-source-GPU loads
    int64_t chunk_tokens = 1 << 16;    ///< tokens per streamed chunk (bounds memory beyond O(L*E^2))
    int64_t window_tokens = 0;         ///< > 0: also record loads per window of this many tokens
};

/// Profiles an in-memory trace. Throws kInvalidArgument for bad options.
RoutingStats profile_trace(const RoutingTrace& trace, const ProfileOptions& options = {});

/// Profiles a trace file by streaming it in chunks: memory O(L*E^2 + chunk). Throws as TraceReader does.
RoutingStats profile_trace_file(const std::string& path, const TraceOverrides& overrides = {},
                                const ProfileOptions& options = {});

/// Merges per-trace statistics into one mix (mixed-dataset profiling). `weights` empty: each trace counts with
/// its tokens, so counts are the plain sums (exactly the statistics of the concatenated traces, except
/// source_load: each trace's tokens are spread over the G GPUs on their own, home GPU floor(t * G / T_d)).
/// Otherwise weights[d] > 0 gives trace d the share weights[d] / sum(weights) of the mix: its counts are scaled
/// by that share times T / T_d (T = sum T_d, the mix's num_tokens) and the sums are rounded to the nearest
/// integer, so the identities of profiled statistics hold up to that rounding. Per-window loads are kept raw and
/// concatenated; window_weight carries the scale. `paths` names the parts in errors and in `sources`.
/// Throws kInvalidArgument for a weight count that differs from the parts or a weight that is not finite and
/// > 0; kInvalidInput naming the path whose E, L, k, G or window size differs from the first part's.
RoutingStats merge_stats(const std::vector<RoutingStats>& parts, const std::vector<std::string>& paths,
                         const std::vector<double>& weights = {});

/// Robust loads [L, E] for planning: each expert's load rate (count / window tokens) at the q-quantile over the
/// windows, windows weighted by their tokens times window_weight (lower quantile: the smallest rate r with at
/// least q of the weight at rates <= r; q = 1 is the maximum), then scaled per layer so the loads sum to the
/// layer's total load (the same total as `load`). A layer whose quantiles are all 0 keeps `load`.
/// Throws kInvalidArgument for q outside (0, 1] or statistics without per-window loads (saying to re-profile).
std::vector<double> robust_loads(const RoutingStats& stats, double q);

/// Writes stats to folder `dir` atomically, as a grace "stats" folder output (write_dir_atomic, grace/io.hpp).
/// Throws kIo for a missing parent folder or a `dir` that is not empty and not a grace stats output.
void save_stats(const RoutingStats& stats, const std::string& dir);
/// Reads a stats folder. Throws kIo / kInvalidInput naming the bad file or shape.
RoutingStats load_stats(const std::string& dir);

/// Builds statistics from aggregated arrays, as C2R-style profilers and SGLang's `logical_count` give them.
/// `coactivation` is [L, E, E] (or [E, E]); `ordered_pairs` = true means it counts ordered pairs (2*A) and is
/// halved (an odd entry throws). `load` is [L, E] (or [E]); it may be empty if only co-activation is known,
/// in which case loads are row sums of A divided by (k-1) (needs top_k >= 2). Throws kInvalidInput for
/// shape mismatches, asymmetric or negative matrices.
RoutingStats stats_from_aggregates(const std::vector<double>& coactivation, const std::vector<int64_t>& coact_shape,
                                   const std::vector<double>& load, const std::vector<int64_t>& load_shape,
                                   bool ordered_pairs, int top_k);

/// Reads the .npy files and calls stats_from_aggregates. `load_path` may be empty.
RoutingStats import_aggregates(const std::string& coactivation_path, const std::string& load_path, bool ordered_pairs,
                               int top_k);

}  // namespace grace
