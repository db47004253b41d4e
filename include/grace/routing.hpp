#pragma once
/// @file routing.hpp
/// Online replica routing (spec §5), shared by the evaluator's replay, the CPU runtime and (by construction)
/// the GPU runtime: given a token's source GPU and a chosen expert, pick the GPU of one of its instances.
///
/// WRR is smooth weighted round-robin (nginx) over integer weights summing to Q. Its pick sequence repeats
/// with period Q, so the router precomputes, for every (source GPU, expert), the length-Q sequence over the
/// instances eligible from that source (all instances for WRR; the nearest tier for TAR) and keeps a counter
/// per (source GPU, expert): the i-th selection takes position (offset + i) mod Q.

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "grace/engine_routing.hpp"
#include "grace/plan.hpp"
#include "grace/topology.hpp"

namespace grace {

/// Smooth weighted round-robin sequence of length sum(weights): entry i is the index (into weights) picked at
/// step i. Ties go to the lowest index. Throws kInvalidArgument for an empty list or a weight < 1.
std::vector<uint8_t> smooth_wrr_sequence(const std::vector<int>& weights);

/// Rounds positive real weights to integers >= 1 summing to `period` (largest remainder, ties to the lower
/// index). Throws kInvalidArgument if period < weights.size().
std::vector<int> round_weights(const std::vector<double>& weights, int period);

/// Stateful router for one layer of a plan. Deterministic: the same plan, policy, seed and sequence of calls
/// give the same picks.
class ReplicaRouter {
  public:
    /// Builds the per-(source GPU, expert) tables. `seed` drives sglang-dynamic. The engine policies
    /// (engine_routing.hpp) route over the layer's slots in export order (slot_map_of); SGLang's static tables
    /// start their random.Random(42) at this layer (exact for a one-layer model; make_engine_routers builds a
    /// whole model's).
    ReplicaRouter(const LayerPlan& layer, const Topology& topology, RoutingPolicy policy, uint64_t seed = 0);
    /// Routes with an engine router over physical slots; every slot must be on a GPU holding an instance of its
    /// expert (two slots of an expert on one GPU are one instance). Throws kInvalidInput otherwise.
    ReplicaRouter(const LayerPlan& layer, const Topology& topology, std::unique_ptr<EngineLayerRouter> engine);
    ~ReplicaRouter();
    ReplicaRouter(ReplicaRouter&&) noexcept;
    ReplicaRouter& operator=(ReplicaRouter&&) noexcept;

    /// GPU chosen for selection j (0 <= j < k) of a token whose flat index in the replayed stream is `token`,
    /// on source GPU `source`, choosing `expert`. `token` matters only to the token-dependent engine policies
    /// (vllm, trtllm, sglang-dynamic), which see `token - token_origin(source)`: the token's index among its
    /// rank's tokens, once the origin is set. Advances the WRR counter of (source, expert).
    int route(int source, int expert, int64_t token, int j, int top_k);
    /// Sets the flat index of `source`'s first token (default 0), so the engine policies see per-rank token
    /// indices as the engines do. The replay sets every source's; a runtime rank sets its own on its first call.
    void set_token_origin(int source, int64_t first_token);
    int64_t token_origin(int source) const { return origins_[static_cast<size_t>(source)]; }
    /// Whether route() depends only on (source, expert) for this policy (primary, sglang-static,
    /// sglang-nearest, vllm-ascend).
    bool fixed_per_source() const;

    /// Position in instance_gpus[expert] of the last pick (for per-instance loads).
    int last_instance() const { return last_instance_; }

    /// WRR counter of (source, expert): how many selections it has routed (mod Q).
    int wrr_offset(int source, int expert) const {
        return offsets_[static_cast<size_t>(source) * num_experts_ + expert];
    }
    /// Replaces the WRR weights ([E][n_e], each expert's summing to the period, instance_gpus order) and rebuilds
    /// every (source, expert) sequence; the counters stay, so the next selection of (source, expert) takes
    /// position offset of the new sequence (online adaptation, adaptation.hpp). WRR and TAR only; throws
    /// kInvalidArgument for another policy or weights of the wrong shape, kInvalidInput for a wrong sum.
    void set_wrr_weights(const std::vector<std::vector<int>>& weights);
    /// Sets all counters back to zero.
    void reset();
    /// Restores the WRR counters, [G * E] (e.g. carried across batches by a runtime).
    void set_offsets(const std::vector<int>& offsets);
    const std::vector<int>& offsets() const { return offsets_; }
    /// The per-(source, expert) pick sequence, period() entries of instance indices (for device-side routing,
    /// which must pick exactly what this router picks). Valid for the WRR and TAR policies.
    const uint8_t* sequence(int source, int expert) const {
        return sequences_.data() + seq_begin_[static_cast<size_t>(source) * num_experts_ + expert];
    }
    /// Flat copy of all sequences, [G * E][Q] (source-major), for upload to a device.
    std::vector<uint8_t> flat_sequences() const;
    int period() const { return period_; }
    RoutingPolicy policy() const { return policy_; }

  private:
    const LayerPlan* layer_;
    Topology topology_;
    RoutingPolicy policy_;
    uint64_t seed_;
    int num_experts_;
    int period_;
    int last_instance_ = 0;
    // For (source, expert): the instance-index sequence (length period_) in sequences_, starting at seq_begin_.
    std::vector<uint8_t> sequences_;
    std::vector<int64_t> seq_begin_;
    std::vector<int> offsets_;
    std::unique_ptr<EngineLayerRouter> engine_;  // engine policies
    std::vector<int> slot_instance_;             // [P]: instance index of each physical slot (engine policies)
    std::vector<int64_t> origins_;               // [G]: first token of each source (engine policies)

    void attach_engine(std::unique_ptr<EngineLayerRouter> engine);
    void build_sequences(const std::vector<std::vector<int>>& weights);
};

/// One router per layer of `plan` (which must outlive them) under `policy` (unset: each layer's own). Engine
/// policies route over `slot_maps` (one per model layer the engine's file holds; the first size - L are leading
/// layers, e.g. dense ones, that only advance SGLang's random stream), or over each layer's slots in export order
/// when empty; SGLang's static tables run one random.Random(42) over all of them. Throws kInvalidInput when the
/// slot maps do not fit the plan, kInvalidArgument for fewer maps than layers.
std::vector<std::unique_ptr<ReplicaRouter>> make_layer_routers(const ExpertPlan& plan,
                                                               const std::optional<RoutingPolicy>& policy,
                                                               uint64_t seed,
                                                               const std::vector<SlotMap>& slot_maps = {});

/// Copy rules of the dispatch layouts (the MPI and GPU layers share them). `dest` is one token's row of k
/// destination GPUs (-1 = none) and dest[j] >= 0.
/// True when selection j is the token's first to GPU dest[j] (flat-dedup sends one copy per token and GPU).
inline bool first_to_gpu(const int32_t* dest, int j) {
    for (int i = 0; i < j; ++i)
        if (dest[i] == dest[j]) return false;
    return true;
}
/// True when selection j is the token's first to node `topo.node_of(dest[j])` (HSC stage 1 sends one copy per
/// token and destination node).
inline bool first_to_node(const int32_t* dest, int j, const Topology& topo) {
    const int b = topo.node_of(dest[j]);
    for (int i = 0; i < j; ++i)
        if (dest[i] >= 0 && topo.node_of(dest[i]) == b) return false;
    return true;
}

}  // namespace grace
