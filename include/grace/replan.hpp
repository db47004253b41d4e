#pragma once
/// @file replan.hpp
/// Migration-aware re-planning (`grace replan`): given a deployed plan and statistics of the traffic it now
/// serves, find a plan reachable from it by a bounded number of slot rewrites that lowers the priced MoE-layer
/// time (placement_cost.hpp) the most per byte of expert weights moved.
///
/// A move rewrites one slot: the instance of expert x on GPU g becomes an instance of expert y (y's weights are
/// copied to g; nothing else moves). x must keep another instance and g must not hold y already, so every plan
/// along the way is valid and keeps each GPU's slot count (a slot-exact plan stays slot-exact). Moving an
/// expert's only instance takes two moves (first add a copy elsewhere, then rewrite the old slot). If the
/// rewritten slot held x's primary, the primary passes to x's instance on the lowest GPU. Every move copies the
/// same bytes (one expert's weights), so the greedy order is by priced gain: at each step, over all layers, the
/// move with the largest drop of its layer's predicted time (ties: lower layer, GPU, removed, added expert),
/// until the budget is spent or no move lowers a layer's time.

#include <cstdint>
#include <vector>

#include "grace/placement_cost.hpp"
#include "grace/plan.hpp"
#include "grace/stats.hpp"

namespace grace {

/// Budget and prices of a re-plan.
struct ReplanOptions {
    int64_t max_moves = -1;      ///< at most this many slot rewrites; -1 = no count limit
    double max_bytes = -1;       ///< at most this many bytes of weights moved; -1 = no byte limit
    double bytes_per_expert = 0; ///< weights of one expert (gate, up and down projections), > 0
    PlacementPricing pricing;    ///< how a layer's time is predicted
    int num_threads = 0;         ///< 0 = all; the result is identical for any count
};

/// One slot rewrite.
struct SlotMove {
    int layer = 0;
    int gpu = 0;
    int removed = 0;           ///< expert whose instance on `gpu` is dropped
    int added = 0;             ///< expert whose weights are copied to `gpu`
    double gain_seconds = 0;   ///< drop of the layer's predicted time
};

/// The outcome of replan().
struct ReplanResult {
    ExpertPlan plan;                  ///< the old plan with the moves applied, routing tables rebuilt
    std::vector<SlotMove> moves;      ///< in the order chosen
    double bytes_moved = 0;           ///< moves.size() * bytes_per_expert
    std::vector<double> time_before;  ///< [L] predicted layer time of the old plan on the new statistics, s
    std::vector<double> time_after;   ///< [L] the same for the new plan
};

/// Priced local search on one layer: the moves of replan() on the layer's own loads, the largest drop of the
/// priced time first, until no move lowers it or `max_moves` (< 0: no limit) are made. Used by the planner after
/// the slot fill (PlanOptions::priced_moves). Adds to layer.num_priced_moves, rebuilds the routing tables if it
/// moved anything, and returns the number of moves.
int refine_layer_priced(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                        int num_experts, const Topology& topology, const PlacementPricing& pricing, int max_moves);

/// Throws kInvalidArgument when neither budget is given, bytes_per_expert <= 0, or the statistics do not match
/// the plan (E, L); kInvalidInput for an invalid plan.
ReplanResult replan(const ExpertPlan& old_plan, const RoutingStats& stats, const ReplanOptions& options);

}  // namespace grace
