#pragma once
/// @file planner.hpp
/// `grace plan`: statistics + topology -> ExpertPlan (spec §3-§5, paper Sec. 4).
///
/// A method is a compact spec of three components, `GROUPING+REPLICATION+ROUTING`, e.g.
/// `hierarchical+dynamic+tar`; `grace` is shorthand for exactly that. Components:
///   grouping:    vanilla | occult | c2r | spectral-full | spectral-controlled[:R] (R a ratio, default: knee)
///                | priced (HG with the node split, the level-2 ratio and Occult's flat groups as candidates, the one
///                the cost model of placement_cost.hpp prices lowest kept: priced_search.hpp)
///                | hierarchical[:R] (R bounds the node-level group sizes to [(1-R)E/N, (1+R)E/N]; without R the node
///                level is fully non-uniform, as in the paper) | metis | eplb-hierarchical | eplb-global
///   replication: none | fixed | dynamic | dynamic-iter (DR repeated on the next heaviest GPU, beyond the paper)
///                | eplb[:SLOTS] (EPLB water-filling with a slot budget; default: fill
///                the GPUs' slots) | priced (dynamic-iter's rounds 0, 1, 2, ..., the cheapest prefix kept)
///   routing:     primary | wrr | tar | vllm | sglang-static | sglang-dynamic | sglang-nearest | vllm-ascend
///                | trtllm
/// Missing trailing components default to `none` and `primary`. `grace` (the default) is `priced+priced+tar`, the
/// fastest by priced time (docs/planning.md, "Priced objective"); `grace-paper` is the paper's exact method,
/// `hierarchical+dynamic+tar`; `eplb` is `eplb-hierarchical+eplb+sglang-static`.

#include <cstdint>
#include <string>

#include "grace/placement_cost.hpp"
#include "grace/plan.hpp"
#include "grace/stats.hpp"
#include "grace/topology.hpp"

namespace grace {

/// A parsed method spec.
struct MethodSpec {
    std::string grouping = "vanilla";
    double controlled_ratio = -1;  ///< spectral-controlled:R; -1 = knee point
    double node_ratio = -1;        ///< hierarchical:R, node-level size bound; -1 = fully non-uniform (paper)
    std::string replication = "none";
    int replication_slots = 0;  ///< eplb:SLOTS, physical experts per layer; 0 = default
    RoutingPolicy routing = RoutingPolicy::kPrimary;
    /// Canonical text, e.g. "hierarchical+dynamic+tar".
    std::string to_string() const;
};

/// Parses a method spec; throws kInvalidArgument naming an unknown component and listing the valid ones.
MethodSpec parse_method(const std::string& text);

/// Planner options.
struct PlanOptions {
    std::string method = "grace";
    uint64_t seed = 0;
    int num_threads = 0;   ///< 0 = all; the plan is byte-identical for any count
    int wrr_period = 120;  ///< Q
    bool refine = false;   ///< spec §3 step 3 (KL swaps) in controlled grouping
    /// With a slot count (topology.slots_per_gpu) and a replication that chooses replicas (fixed, dynamic,
    /// dynamic-iter): fill every GPU to exactly that many instances with priced replicas (fill_free_slots), so
    /// exports pad nothing. false: the slot count is only an upper bound.
    bool fill_slots = true;
    /// Slot-exact plans, after the fill: at most this many priced slot rewrites per layer (refine_layer_priced:
    /// an instance of a replicated expert becomes one of another expert wherever that lowers the priced layer
    /// time); -1 = until none does, 0 = none. The default, 8, takes most of the gain (docs/planning.md) at a
    /// bounded cost: each move searches every (replica slot, expert) pair of the layer.
    int priced_moves = 8;
    /// > 0: replicate and weight the routing tables (and everything else that reads loads) by robust_loads(stats,
    /// q) instead of the mean loads: each expert's q-quantile load over the windows of the profile, q in (0, 1].
    /// Needs statistics with per-window loads (grace profile --window-tokens); grouping still reads the affinity.
    double robust_quantile = 0;
    /// The hardware and model numbers the fill prices replicas with (placement_cost.hpp; default: its defaults).
    PlacementPricing pricing;
};

/// Whether make_plan prices placements with options.pricing for this method and topology: a slot-exact fill, or a
/// `priced` grouping or replication. Throws as parse_method.
bool uses_pricing(const PlanOptions& options, const Topology& topology);

/// Plans every layer. Throws kInvalidArgument for an impossible request (more GPUs than experts, too few
/// slots for every expert, a zero in the topology, an unknown method component, a knee search with one point
/// when a knee is required), kInvalidInput for malformed statistics.
ExpertPlan make_plan(const RoutingStats& stats, const Topology& topology, const PlanOptions& options);

}  // namespace grace
