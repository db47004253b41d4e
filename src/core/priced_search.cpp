#include "grace/priced_search.hpp"

#include <algorithm>
#include <cmath>

#include "grace/error.hpp"
#include "grace/replication.hpp"

namespace grace {

double price_layer(const LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                   const Topology& topology, const PlacementPricing& pricing) {
    const int E = static_cast<int>(load.size());
    std::vector<std::vector<int>> inst(E);
    for (int g = 0; g < static_cast<int>(layer.gpu_experts.size()); ++g)
        for (int e : layer.gpu_experts[g]) {
            GRACE_CHECK_ARG(e >= 0 && e < E, "price_layer: expert ", e, " outside [0, ", E, ")");
            inst[e].push_back(g);
        }
    return LayerCostModel(load, source_load, inst, topology, pricing).time();
}

size_t cheapest(const std::vector<double>& prices) {
    GRACE_CHECK_ARG(!prices.empty(), "cheapest: no candidate");
    size_t best = 0;
    for (size_t i = 1; i < prices.size(); ++i)
        if (prices[i] < prices[best] * (1 - 1e-9)) best = i;
    return best;
}

int replicate_priced(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                     const Topology& topology, const PlacementPricing& pricing, double* price) {
    const int E = static_cast<int>(load.size()), G = topology.num_gpus();
    GRACE_CHECK_ARG(static_cast<int>(layer.primary_gpu.size()) == E, "replicate_priced: ", layer.primary_gpu.size(),
                    " primaries for ", E, " loads");
    // One price model, built on the primaries; each round only adds instances, so it is updated in place.
    std::vector<std::vector<int>> inst(E);
    std::vector<char> holds(static_cast<size_t>(G) * E, 0);
    for (int g = 0; g < G; ++g)
        for (int e : layer.gpu_experts[g]) {
            inst[e].push_back(g);
            holds[static_cast<size_t>(g) * E + e] = 1;
        }
    LayerCostModel cost(load, source_load, inst, topology, pricing);
    const LayerPlan primaries = layer;
    ReplicationOptions ro;
    ro.method = ReplicationMethod::kNone;
    replicate_layer(layer, load, topology, ro);  // records gamma and the loads before replication
    double best_price = cost.time();
    int best_rounds = 0, rounds = 0;
    ro.method = ReplicationMethod::kDynamicIterative;
    ro.target_skew = 1.0;
    ro.after_round = [&](const LayerPlan& now) {
        ++rounds;
        for (int g = 0; g < G; ++g)
            for (int e : now.gpu_experts[g])
                if (!holds[static_cast<size_t>(g) * E + e]) {
                    holds[static_cast<size_t>(g) * E + e] = 1;
                    cost.add(e, g);
                }
        const double p = cost.time();
        if (p < best_price * (1 - 1e-9)) best_price = p, best_rounds = rounds;
    };
    if (G > 1) {
        LayerPlan all = primaries;
        replicate_layer(all, load, topology, ro);
        if (best_rounds > 0) {
            // Rounds are deterministic: replaying the first best_rounds gives the cheapest prefix.
            ro.after_round = nullptr;
            ro.max_rounds = best_rounds;
            layer = primaries;
            replicate_layer(layer, load, topology, ro);
        }
    }
    if (price) *price = best_price;
    return best_rounds;
}

const std::vector<double>& node_split_ratios() {
    static const std::vector<double> ratios = {0.0, 0.125, 0.25, 0.5};
    return ratios;
}

std::vector<Grouping> node_split_candidates(const std::vector<double>& affinity, int num_experts,
                                            const Grouping& spectral, int min_size, int max_size) {
    std::vector<Grouping> out = {spectral};
    const int n = spectral.num_groups;
    for (double r : node_split_ratios()) {
        auto [lo, hi] = controlled_bounds(num_experts, n, r, max_size);
        lo = std::max(lo, min_size);
        if (static_cast<int64_t>(lo) * n > num_experts || static_cast<int64_t>(hi) * n < num_experts) continue;
        Grouping g = controlled_grouping(affinity, num_experts, spectral, lo, hi, false);
        const bool seen = std::any_of(out.begin(), out.end(), [&](const Grouping& x) { return x.group_of == g.group_of; });
        if (!seen) out.push_back(std::move(g));
    }
    return out;
}

}  // namespace grace
