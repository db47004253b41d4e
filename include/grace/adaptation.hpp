#pragma once
/// @file adaptation.hpp
/// Online adaptation of the WRR weights without moving expert weights (issue #13 item 3).
///
/// Every N batches, each layer's WRR weights are re-predicted with the planner's own rule (Equation 4 as
/// build_routing_tables applies it: expert e's load l_e split evenly over its n_e instances, L'_g the sum over
/// the instances on g, instance weights proportional to 1 / L'_g rounded to the period) from the loads observed
/// since the last update instead of the profile's. The observed load of expert e is the number of its
/// selections: the sum of its per-instance counts over the interval, summed over every rank, so every rank (and
/// the replay) builds the same table. Placement never changes; the WRR counters carry over (the next selection
/// of (source, expert) reads the new sequence at the counter's position).
///
/// History: with decay d in [0, 1), the load used at an update is h <- d * h + w, where w holds the interval's
/// counts (h starts at 0). d = 0 (the default) uses the interval's counts only. When h is zero for every expert
/// (an interval without tokens), the weights stay as they are.
///
/// A batch is one forward call of every rank: each GPU's next `batch_tokens` tokens of its own block of the trace
/// (home_gpu), as `grace run --batch-tokens B` feeds them. The update after batch b (0-based) happens when
/// (b + 1) % N == 0 and applies from batch b + 1 on.
///
/// Used by the replay (replay_adaptive, `grace eval --adapt N`), the MPI runtime (`grace run --adapt N`) and the GPU
/// runtime; all three call WrrAdapter, so their tables are identical (tests/mpi, tests/cuda).

#include <cstdint>
#include <vector>

#include "grace/eval.hpp"
#include "grace/plan.hpp"
#include "grace/trace.hpp"

namespace grace {

/// Adaptation settings.
struct AdaptationOptions {
    int interval = 0;           ///< N: batches between updates; 0 = no adaptation
    int64_t batch_tokens = 64;  ///< tokens per GPU per batch (the replay's batch cut; the runtimes use theirs)
    double decay = 0;           ///< history weight d in [0, 1)

    /// Throws kInvalidArgument naming the option (--adapt, --adapt-batch-tokens, --adapt-decay) for N < 0,
    /// batch_tokens < 1 or d outside [0, 1).
    void validate() const;
};

/// Start of each expert's instances in the flat per-instance order (experts in id order, instances in
/// instance_gpus order), [E + 1]. `layer` must be finalized.
std::vector<int> instance_offsets(const LayerPlan& layer);

/// Equation 4 re-prediction (pure, deterministic): the WRR weights [E][n_e] that build_routing_tables gives
/// `layer` for the per-expert loads `expert_load` [E] (non-negative). Throws kInvalidArgument for a wrong size
/// or a negative load.
std::vector<std::vector<int>> repredict_wrr_weights(const LayerPlan& layer, const std::vector<double>& expert_load,
                                                    int num_gpus);

/// Adds one batch's selections to `counts` (flat per-instance, sized instance_offsets(layer).back()): the
/// selection (t, j) of expert topk_ids[t*k+j] sent to GPU dest_gpus[t*k+j] counts for the instance on that GPU.
/// Selections with id -1 are skipped. Throws kInvalidArgument for an id out of range or a destination that holds
/// no instance of the expert.
void count_instance_selections(const LayerPlan& layer, const int32_t* topk_ids, const int32_t* dest_gpus,
                               int64_t num_tokens, int top_k, std::vector<int64_t>& counts);

/// The adaptation state of one layer: the history and the current weights.
class WrrAdapter {
  public:
    /// Starts from the layer's own weights. `layer` must be finalized; it is copied.
    WrrAdapter(const LayerPlan& layer, int num_gpus, const AdaptationOptions& options);

    /// Whether batch `batch` (0-based) ends an interval.
    bool due(int64_t batch) const { return interval_ > 0 && (batch + 1) % interval_ == 0; }
    /// One update from the interval's counts, flat per-instance [instances], summed over every rank. Returns the
    /// new weights [E][n_e]. Throws kInvalidArgument for a wrong size or a negative count.
    const std::vector<std::vector<int>>& update(const std::vector<int64_t>& interval_counts);
    const std::vector<std::vector<int>>& weights() const { return weights_; }
    /// Updates made so far.
    int updates() const { return updates_; }
    /// FNV-1a over every table produced so far, in order (the initial weights excluded): two implementations
    /// built the same tables iff the hashes agree (and the final weights match).
    uint64_t tables_hash() const { return hash_; }
    int num_instances() const { return offsets_.back(); }

  private:
    LayerPlan layer_;
    int num_gpus_;
    int interval_;
    double decay_;
    std::vector<int> offsets_;
    std::vector<double> history_;  // [E]
    std::vector<std::vector<int>> weights_;
    int updates_ = 0;
    uint64_t hash_ = 14695981039346656037ull;
};

/// Combines per-layer WrrAdapter::tables_hash values into one (FNV-1a over them in layer order).
uint64_t combine_tables_hashes(const std::vector<uint64_t>& layer_hashes);

/// What an adaptive replay produced.
struct AdaptiveReplay {
    std::vector<LayerCounts> counts;                           ///< [L], as Replayer::counts
    std::vector<std::vector<std::vector<int>>> final_weights;  ///< [L][E][n_e] after the last update
    std::vector<uint64_t> layer_hashes;                        ///< [L] WrrAdapter::tables_hash
    int64_t batches = 0;                                       ///< batches per layer
    int updates = 0;                                           ///< updates per layer
};

/// Replays `trace` through `plan` batch by batch (AdaptationOptions::batch_tokens per GPU), re-predicting every
/// layer's WRR weights every `options.interval` batches as the runtimes do. Layers run in parallel over
/// replay.num_threads threads; results are identical for any count. Every layer must route with wrr or tar (the
/// override or the plan's): throws kInvalidArgument otherwise; throws as check_plan_matches_trace.
AdaptiveReplay replay_adaptive(const RoutingTrace& trace, const ExpertPlan& plan, const ReplayOptions& replay,
                               const AdaptationOptions& options);

}  // namespace grace
