#pragma once
/// @file placement_cost.hpp
/// The planner's price of one layer's placement (spec §4 "slot-exact plans", priced with §7's model), computed
/// from statistics rather than a trace replay, so that the planner can compare thousands of candidate replicas.
///
/// Model, for layer loads l_e and source loads s_{g,e} (tokens whose home GPU is g that select e; the profile's
/// source_load when it has one, else l_e / G from every GPU):
///   routing   TAR: the selections of e from home g go to e's instances on g, else on g's node, else anywhere,
///             split evenly over that tier;
///   compute   C_g = sum over instances on g of f(n), n the tokens the instance receives;
///   traffic   one copy per selection whose destination is not its home GPU (flat counting: HSC's per-node
///             de-duplication needs co-activation, which only lowers cross-node counts further);
///   time      T = 2 * (t_cross + t_intra) + max_g C_g, where t_cross = the busiest direction of the busiest
///             node's NIC (bytes / B_net) and t_intra = the busiest direction of the busiest GPU's NVLink
///             (bytes / B_nvl); the factor 2 is dispatch + combine. Latency terms are left out (they do not
///             depend on which replica is added).

#include <cstdint>
#include <functional>
#include <vector>

#include "grace/topology.hpp"

namespace grace {

/// The hardware and model numbers the planner prices with.
struct PlacementPricing {
    double bytes_per_token = 4096;  ///< H * element size (default: H = 2048, bf16)
    double net_bandwidth = 3.125e9; ///< B_net: bytes/s per node per direction (default 25 Gbit/s)
    double nvl_bandwidth = 600e9;   ///< B_nvl: bytes/s per GPU per direction (default 600 GB/s)
    /// Seconds for one expert instance to process n tokens (n may be fractional: a predicted count). Unset:
    /// the analytic default of hardware.hpp at H = 2048, I = 1024, 200 TFLOP/s, n_half = 100.
    std::function<double(double)> expert_seconds;
    /// Throws kInvalidArgument for a non-positive size or bandwidth.
    void validate() const;
};

/// Incremental price of one layer's placement: built from the instances, it answers "what would the layer
/// cost with one more replica of e on g" in O(G * n_e) without rebuilding the totals.
class LayerCostModel {
  public:
    /// `load` [E]; `source_load` [G * E] (row g = home GPU g) or empty for l_e / G from every GPU;
    /// `instance_gpus` [E] lists of distinct GPUs, each non-empty. Throws kInvalidArgument on a size mismatch.
    LayerCostModel(const std::vector<double>& load, const std::vector<double>& source_load,
                   const std::vector<std::vector<int>>& instance_gpus, const Topology& topology,
                   const PlacementPricing& pricing);
    /// Predicted MoE-layer time of the current placement, seconds.
    double time() const;
    /// Predicted time with one more instance of `expert` on `gpu` (which must not hold it yet).
    double time_with(int expert, int gpu) const;
    /// time_with(expert, g) for every g with allowed[g] != 0 (and not holding it), into out [G]; +inf elsewhere.
    /// `mean_out` [G] gets the tie-breaker: the same formula with means over nodes and GPUs instead of maxima
    /// (many candidates leave the busiest GPU and link as they are). Shares the work of removing the expert's
    /// current contribution across the GPUs.
    void times_with(int expert, const std::vector<char>& allowed, std::vector<double>& out,
                    std::vector<double>& mean_out) const;
    /// Predicted time with expert e left out entirely: a lower bound of time_with(e, g) for every g, since adding
    /// an expert's (non-negative) contribution back never lowers a total.
    double time_without(int expert) const;
    /// time_without(e) for every expert, into out [E] (the same values; ranks the totals once for all of them).
    void times_without(std::vector<double>& out) const;
    /// Adds that instance for good.
    void add(int expert, int gpu);
    /// Slot rewrites (re-planning): the predicted time when the instance of `removed` on `gpu` (which must hold it,
    /// with another instance elsewhere) is replaced by an instance of expert y, for every y with can_add[y] != 0
    /// that `gpu` does not hold, into out [E]; +inf elsewhere.
    void swap_times(int gpu, int removed, const std::vector<char>& can_add, std::vector<double>& out) const;
    /// Makes that rewrite for good.
    void swap(int gpu, int removed, int added);
    /// The current placement's bottlenecks, the terms of time(): copies on the busiest direction of the busiest
    /// node's NIC and of the busiest GPU's NVLink, and the slowest GPU's compute in seconds.
    struct Bottlenecks {
        double cross_copies = 0, intra_copies = 0, compute_seconds = 0;
    };
    Bottlenecks bottlenecks() const;
    /// The pricing in use (with the analytic default filled in when none was given).
    const PlacementPricing& pricing() const { return pricing_; }
    /// Instances of each expert (the constructor's lists plus what add() put there).
    const std::vector<std::vector<int>>& instances() const { return inst_; }

  private:
    // All totals in one array, so a candidate can be applied and undone in place: [compute G | intra_out G |
    // intra_in G | cross_out N | cross_in N]; compute in seconds, the rest in copies.
    using Totals = std::vector<double>;
    size_t compute_at(int g) const { return static_cast<size_t>(g); }
    size_t intra_out_at(int g) const { return static_cast<size_t>(num_gpus_) + g; }
    size_t intra_in_at(int g) const { return 2 * static_cast<size_t>(num_gpus_) + g; }
    size_t cross_out_at(int n) const { return 3 * static_cast<size_t>(num_gpus_) + n; }
    size_t cross_in_at(int n) const { return 3 * static_cast<size_t>(num_gpus_) + topology_.nodes + n; }
    // Adds sign * expert e's contribution, with instances `gpus`, to t.
    void apply(Totals& t, int e, const std::vector<int>& gpus, double sign) const;
    double price(const Totals& t) const;
    // price(base_ + d) for a sparse d (each index once) without touching base_, in O(|d|) plus a short scan: the
    // untouched entries' maximum of each term is the first untouched one in rank_base()'s order. Bit-identical
    // to applying d and calling price (the same sums, the same maxima).
    double price_with(const std::vector<std::pair<size_t, double>>& d) const;
    // Ranks base_'s entries of each term (compute, intra, cross) by value, descending, for price_with.
    void rank_base() const;
    // The change of the totals when `expert` gains an instance on `gpu` (nonzero entries only); cached per
    // (expert, gpu) until the expert's instances change, since a slot-rewrite search asks for it once per
    // (replica slot, expert) pair.
    const std::vector<std::pair<size_t, double>>& add_delta(int expert, int gpu) const;
    // The change when `expert` is left out entirely (cached likewise).
    const std::vector<std::pair<size_t, double>>& remove_delta(int expert) const;
    // Records the nonzero entries that fn leaves in scratch_ (zeros before it) into d, in index order, and clears
    // them. Every consumer of d uses each index once, so the order does not change any sum or maximum.
    template <class Fn>
    void delta_into(std::vector<std::pair<size_t, double>>& d, Fn fn) const;
    void forget_deltas(int expert);
    double mean_price(const Totals& t) const;

    int num_experts_, num_gpus_;
    Topology topology_;
    PlacementPricing pricing_;
    std::vector<double> load_, source_;  // source_ [G * E]
    std::vector<int> node_of_;           // [G]
    std::vector<std::vector<int>> inst_;
    Totals totals_;
    mutable Totals base_;  // reused buffers of times_with (one model per thread)
    mutable std::vector<int> gpus_;
    mutable std::vector<int> slot_on_gpu_;  // apply(): [G] the instance on each GPU, -1 for none (-1 between uses)
    mutable std::vector<int> on_node_;      // apply(): [nodes] instances per node (0 between uses)
    mutable std::vector<std::vector<std::pair<size_t, double>>> add_delta_;     // [E * G]
    mutable std::vector<char> add_delta_known_;                                 // [E * G]
    mutable std::vector<std::vector<std::pair<size_t, double>>> remove_delta_;  // [E]
    mutable std::vector<char> remove_delta_known_;                              // [E]
    mutable Totals scratch_;                                                    // zeros between uses
    mutable std::vector<uint32_t> ranked_[3];  // rank_base(): base_'s indices per term, the largest first
    mutable uint32_t ranked_top_[3] = {0, 0, 0};  // how many of ranked_[term] are in order
    mutable std::vector<uint32_t> mark_;       // [totals size]: == stamp_ where the current d touches
    mutable uint32_t stamp_ = 0;
};

}  // namespace grace
