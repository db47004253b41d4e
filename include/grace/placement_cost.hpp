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
    /// Adds that instance for good.
    void add(int expert, int gpu);
    /// Instances of each expert (the constructor's lists plus what add() put there).
    const std::vector<std::vector<int>>& instances() const { return inst_; }

  private:
    struct Totals {
        std::vector<double> compute;               // [G] seconds
        std::vector<double> cross_out, cross_in;   // [N] copies
        std::vector<double> intra_out, intra_in;   // [G] copies
    };
    // Adds sign * expert e's contribution, with instances `gpus`, to t.
    void apply(Totals& t, int e, const std::vector<int>& gpus, double sign) const;
    double price(const Totals& t) const;
    double mean_price(const Totals& t) const;

    int num_experts_, num_gpus_;
    Topology topology_;
    PlacementPricing pricing_;
    std::vector<double> load_, source_;  // source_ [G * E]
    std::vector<std::vector<int>> inst_;
    Totals totals_;
    mutable Totals base_, scratch_;  // reused buffers of times_with (one model per thread)
    mutable std::vector<int> gpus_;
};

}  // namespace grace
