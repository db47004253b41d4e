#pragma once
/// @file replication.hpp
/// Expert replication and routing-table construction for one layer (spec §4 and §5).
///
/// The input is a layer whose primaries are placed (LayerPlan::gpu_experts holds exactly the primaries and
/// LayerPlan::primary_gpu says where each expert lives) and the per-expert loads l_e. Replication adds
/// replicas only: a primary is never moved, no GPU ever holds two instances of one expert, and a GPU never
/// holds more than `slots_per_gpu` instances when the topology sets it.

#include <functional>
#include <string>
#include <vector>

#include "grace/placement_cost.hpp"
#include "grace/plan.hpp"
#include "grace/topology.hpp"

namespace grace {

/// Which replication strategy to apply.
enum class ReplicationMethod {
    kNone,     ///< primaries only
    kFixed,    ///< FR: one replica of each hot expert, on the least-loaded GPU (before replication)
    kDynamic,  ///< DR: R (Equation 3) replicas of each hot expert on the R least-loaded eligible GPUs
    kEplb,     ///< EPLB water-filling with a slot budget (replicate_experts), replicas placed greedily
    /// DR repeated (spec §4, beyond the paper): after each round the GPU with the highest predicted load
    /// (Equation 4, every instance of an expert taking an equal share) gets a DR round of its own, while the
    /// predicted skew stays above ReplicationOptions::target_skew, slots remain and a round adds a replica;
    /// a later round that does not lower the spread of the predicted loads is undone. Round 1 is exactly kDynamic.
    kDynamicIterative,
};

/// "none", "fixed", "dynamic", "eplb".
std::string to_string(ReplicationMethod method);
/// Inverse of to_string; throws kInvalidArgument listing the valid names.
ReplicationMethod parse_replication_method(const std::string& name);

/// Options of replicate_layer.
struct ReplicationOptions {
    ReplicationMethod method = ReplicationMethod::kDynamic;
    /// kEplb only: total physical slots of the layer (primaries + replicas); 0 = fill every GPU up to its
    /// slot capacity (or, without a capacity, one extra slot per GPU: G * (ceil(E/G) + 1)).
    int eplb_slots = 0;
    /// kDynamicIterative only: stop once max/mean of the predicted GPU loads is at most this.
    double target_skew = 1.05;
    /// kDynamicIterative only: at most this many rounds (0 = no bound but G); the priced search (priced_search.hpp)
    /// walks the rounds one at a time.
    int max_rounds = 0;
    /// kDynamicIterative only: called with the layer after every kept round (the priced search prices each).
    std::function<void(const LayerPlan&)> after_round;
};

/// L_g: sum of `load` over the experts whose primary is on g, [G].
std::vector<double> primary_gpu_loads(const std::vector<double>& load, const std::vector<int>& primary_gpu,
                                      int num_gpus);

/// gamma = max_g L_g / mean_g L_g (1 when every load is zero).
double load_skew(const std::vector<double>& gpu_load);

/// Equation 3: R = min(G - 1, ceil(gamma) - 1), never below 0. gamma within 1e-9 of an integer counts as that
/// integer (so a perfectly balanced layer gets R = 0 despite rounding noise).
int replica_count(double gamma, int num_gpus);

/// Hot experts of the heavy GPU h (spec §4): its primaries sorted by load descending (ties: lower id), the
/// shortest prefix whose cumulative load reaches (L_max - L_mean) * (R + 1) / R, or all of them. Empty if R = 0.
std::vector<int> hot_experts(const std::vector<double>& load, const std::vector<int>& primary_gpu,
                             const std::vector<double>& gpu_load, int heavy_gpu, int num_replicas);

/// Equation 4, generalised: each instance of expert e carries l_e / n_e (n_e its instance count), so
/// L'_g = sum over instances on g. With DR this equals Equation 4 exactly. [G]
std::vector<double> predict_gpu_loads(const LayerPlan& layer, const std::vector<double>& load, int num_gpus);

/// Adds replicas to `layer` (whose gpu_experts holds the primaries) per `options`, and records gamma, R, the
/// hot experts and gpu_load_before. Does not touch primary_gpu. Throws kInvalidArgument for a load vector of
/// the wrong size or negative loads.
void replicate_layer(LayerPlan& layer, const std::vector<double>& load, const Topology& topology,
                     const ReplicationOptions& options);

/// Fills routing tables: finalize(), predicted_gpu_load (predict_gpu_loads) and WRR weights
/// w_j proportional to 1 / L'_j over e's instances, rounded to integers summing to layer.wrr_period
/// (round_weights). A zero predicted load is floored at 1e-9 of the mean so weights stay finite.
/// Throws kInvalidArgument if an expert has more instances than the period.
void build_routing_tables(LayerPlan& layer, const std::vector<double>& load, int num_experts, int num_gpus);

/// Pads every GPU to the same number of instances (the largest count, or `target` if larger): repeatedly gives
/// the GPU with the fewest instances (lowest index on ties) the expert it lacks with the highest load per
/// instance l_e / n_e (lowest id on ties). Never creates a duplicate on one GPU. Returns the number of padding
/// replicas added. Routing tables are rebuilt. Throws kInvalidArgument if `target` exceeds E or the slot
/// capacity.
int pad_to_equal_slots(LayerPlan& layer, const std::vector<double>& load, int num_experts, const Topology& topology,
                       int target = 0);

/// Slot-exact fill (spec §4): while a GPU holds fewer than S = topology.slots_per_gpu instances, adds the replica
/// (an expert on a GPU with a free slot that does not hold it yet) with the lowest priced layer time
/// (LayerCostModel: TAR routing, compute and the busiest link), ties to the lower expert id, then the lower GPU.
/// Every GPU then holds exactly S instances. `source_load` is [G * E] (home GPU-major) or empty (even sources).
/// Adds to layer.num_fill_replicas and rebuilds the routing tables; returns the number of replicas added.
/// Throws kInvalidArgument without a slot count, for S > E, or when a GPU already holds more than S.
int fill_free_slots(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                    int num_experts, const Topology& topology, const PlacementPricing& pricing);

}  // namespace grace
