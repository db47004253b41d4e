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
    const int G = topology.num_gpus();
    const LayerPlan primaries = layer;
    ReplicationOptions ro;
    ro.method = ReplicationMethod::kNone;
    replicate_layer(layer, load, topology, ro);
    LayerPlan best = layer;
    double best_price = price_layer(layer, load, source_load, topology, pricing);
    int best_rounds = 0, last_instances = layer.num_instances();
    ro.method = ReplicationMethod::kDynamicIterative;
    ro.target_skew = 1.0;
    for (int k = 1; k <= G; ++k) {
        LayerPlan cand = primaries;
        ro.max_rounds = k;
        replicate_layer(cand, load, topology, ro);
        const int instances = cand.num_instances();
        if (instances == last_instances) break;  // round k added nothing: later rounds are the same plan
        last_instances = instances;
        const double p = price_layer(cand, load, source_load, topology, pricing);
        if (p < best_price * (1 - 1e-9)) best = std::move(cand), best_price = p, best_rounds = k;
    }
    layer = std::move(best);
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
