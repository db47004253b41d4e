#pragma once
/// @file priced_search.hpp
/// The planner's priced choices (issue #13): among candidate placements of one layer, keep the one that the cost
/// model of placement_cost.hpp (spec §7: busier direction of each node's NIC, each GPU's NVLink, the slowest GPU's
/// expert compute) prices lowest, instead of the one with the fewest cross-node copies.
///
/// Used by the `priced` grouping and `priced` replication of planner.hpp (the default method `grace`):
///   grouping    HG whose level-1 node split is chosen among node_split_candidates and whose level-2 ratio is
///               chosen among the knee point (the paper's), uniform and fully non-uniform, and the flat Occult and
///               METIS groupings packed onto nodes, each candidate priced after its replication;
///   replication dynamic-iter rounds 0, 1, 2, ... (replicate_priced), the cheapest prefix kept.

#include <vector>

#include "grace/grouping.hpp"
#include "grace/placement_cost.hpp"
#include "grace/plan.hpp"
#include "grace/topology.hpp"

namespace grace {

/// Predicted MoE-layer time (seconds) of `layer`'s instances (gpu_experts) with LayerCostModel. `load` [E];
/// `source_load` [G * E] or empty (even sources). Throws kInvalidArgument as LayerCostModel (sizes, an expert with
/// no instance).
double price_layer(const LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                   const Topology& topology, const PlacementPricing& pricing);

/// HSC's cross-node copies (spec §6: one copy per token and remote destination node) of a placement under TAR,
/// estimated from the statistics, on the busiest direction of the busiest node's NIC. For home node a and node b:
/// S_ab = selections homed on a of experts with no instance on a, times the share of their instances on b (TAR
/// sends them anywhere, evenly); P_ab = co-activated pairs among them (affinity A_ef times both shares times the
/// pair's share homed on a); tokens a -> b ~ S_ab^2 / (S_ab + 2 P_ab), exact when every such token sends the same
/// number of selections to b and a lower bound otherwise. `instance_gpus` [E] lists, `load` [E], `source_load`
/// [G * E] or empty (even sources), `affinity` [E * E].
double hsc_cross_copies(const std::vector<std::vector<int>>& instance_gpus, const std::vector<double>& load,
                        const std::vector<double>& source_load, const std::vector<double>& affinity,
                        const Topology& topology);

/// LayerCostModel's price with its cross-node term replaced by hsc_cross_copies: what the candidates of the priced
/// grouping and replication are judged by when the affinity is known (`affinity` empty: model.time()).
double hsc_price(const LayerCostModel& model, const std::vector<double>& load, const std::vector<double>& source_load,
                 const std::vector<double>& affinity, const Topology& topology);

/// Index of the lowest price; a later candidate wins only when it is cheaper by more than a relative 1e-9, so ties
/// (and rounding noise) keep the earlier one: candidates are listed with the paper's choice first. Throws
/// kInvalidArgument for an empty list.
size_t cheapest(const std::vector<double>& prices);

/// DR rounds searched by price: the candidates are no replication and the first k rounds of dynamic-iter (every
/// round the predicted-heaviest GPU's hot experts are replicated, spec §4 beyond the paper; skew target 1, so the
/// rounds stop only when a round adds nothing, no longer lowers the spread of the predicted loads, G rounds are
/// done, or slots run out) for k = 1, 2, ...; the cheapest is applied to `layer` (whose gpu_experts holds the
/// primaries, as replicate_layer wants). Returns the rounds chosen (0 = none) and, with `price`, its price.
/// With `affinity` [E * E] (non-empty), rounds are priced by hsc_price, else by LayerCostModel::time.
int replicate_priced(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                     const Topology& topology, const PlacementPricing& pricing, double* price = nullptr,
                     const std::vector<double>& affinity = {});

/// The node ratios whose controlled level-1 splits are candidates next to the spectral one: 0 (balanced), 0.125,
/// 0.25, 0.5.
const std::vector<double>& node_split_ratios();

/// Level-1 (node) candidates of HG for `affinity` [E, E]: first `spectral` (the paper's fully non-uniform split,
/// already within the node capacity), then controlled_grouping of it to each ratio of node_split_ratios (sizes at
/// least `min_size`, at most the node capacity `max_size`, 0 = none), groupings equal to an earlier one dropped.
std::vector<Grouping> node_split_candidates(const std::vector<double>& affinity, int num_experts,
                                            const Grouping& spectral, int min_size, int max_size);

}  // namespace grace
