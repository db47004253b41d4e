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

double hsc_cross_copies(const std::vector<std::vector<int>>& instance_gpus, const std::vector<double>& load,
                        const std::vector<double>& source_load, const std::vector<double>& affinity,
                        const Topology& topology) {
    const int E = static_cast<int>(load.size()), G = topology.num_gpus(), N = topology.nodes;
    GRACE_CHECK_ARG(static_cast<int>(instance_gpus.size()) == E && affinity.size() == static_cast<size_t>(E) * E &&
                        (source_load.empty() || source_load.size() == static_cast<size_t>(G) * E),
                    "hsc_cross_copies: sizes do not match ", E, " experts on ", G, " GPUs");
    if (N == 1) return 0;
    std::vector<double> out(N, 0.0), in(N, 0.0);
    std::vector<int> remote;      // experts with no instance on node a
    std::vector<double> q, home;  // [|remote| * N] share of instances on node b; [|remote|] selections homed on a
    std::vector<double> sel(N), pairs(N);
    std::vector<std::vector<size_t>> on_node(N);
    std::vector<size_t> spread;
    for (int a = 0; a < N; ++a) {
        remote.clear();
        q.clear();
        home.clear();
        for (int e = 0; e < E; ++e) {
            const auto& gs = instance_gpus[e];
            bool on_a = false;
            for (int g : gs) on_a = on_a || topology.node_of(g) == a;
            if (on_a || gs.empty()) continue;
            double h = 0;
            for (int m = 0; m < topology.gpus_per_node; ++m) {
                const int s = topology.gpu_at(a, m);
                h += source_load.empty() ? load[e] / G : source_load[static_cast<size_t>(s) * E + e];
            }
            if (h <= 0) continue;
            remote.push_back(e);
            home.push_back(h);
            const size_t at = q.size();
            q.resize(at + N, 0.0);
            for (int g : gs) q[at + topology.node_of(g)] += 1.0 / static_cast<double>(gs.size());
        }
        std::fill(sel.begin(), sel.end(), 0.0);
        std::fill(pairs.begin(), pairs.end(), 0.0);
        const size_t R = remote.size();
        // Experts whose instances all sit on one node b (most of them) pair only with the others on b: bucket them
        // by node; the few spread over several nodes pair with everyone, weighted by both shares.
        for (auto& bucket : on_node) bucket.clear();
        spread.clear();
        std::vector<double> weight(R);  // share of the expert's selections homed on a
        std::vector<char> is_spread(R, 0);
        for (size_t i = 0; i < R; ++i) {
            const double* qe = &q[i * N];
            for (int b = 0; b < N; ++b) sel[b] += home[i] * qe[b];
            weight[i] = load[remote[i]] > 0 ? home[i] / load[remote[i]] : 0;
            int only = -1;
            for (int b = 0; b < N; ++b)
                if (qe[b] > 0) only = (only == -1) ? b : -2;
            if (only >= 0)
                on_node[only].push_back(i);
            else
                spread.push_back(i), is_spread[i] = 1;
        }
        auto pair_term = [&](size_t i, size_t j) {
            return affinity[static_cast<size_t>(remote[i]) * E + remote[j]] * 0.5 * (weight[i] + weight[j]);
        };
        for (int b = 0; b < N; ++b) {
            const auto& u = on_node[b];
            double sum = 0;
            for (size_t x = 0; x < u.size(); ++x)
                for (size_t y = x + 1; y < u.size(); ++y) sum += pair_term(u[x], u[y]);
            pairs[b] += sum;
        }
        for (size_t x = 0; x < spread.size(); ++x) {
            const size_t i = spread[x];
            for (size_t j = 0; j < R; ++j) {
                if (j == i) continue;
                // each spread-spread pair once (from its lower index); spread-bucketed pairs from the spread side
                if (is_spread[j] && j < i) continue;
                const double t = pair_term(i, j);
                if (t == 0) continue;
                for (int b = 0; b < N; ++b) pairs[b] += t * q[i * N + b] * q[j * N + b];
            }
        }
        for (int b = 0; b < N; ++b) {
            if (b == a || sel[b] <= 0) continue;
            const double tokens = sel[b] * sel[b] / (sel[b] + 2 * pairs[b]);
            out[a] += tokens;
            in[b] += tokens;
        }
    }
    double busiest = 0;
    for (int n = 0; n < N; ++n) busiest = std::max({busiest, out[n], in[n]});
    return busiest;
}

double hsc_price(const LayerCostModel& model, const std::vector<double>& load, const std::vector<double>& source_load,
                 const std::vector<double>& affinity, const Topology& topology) {
    if (affinity.empty()) return model.time();
    const LayerCostModel::Bottlenecks b = model.bottlenecks();
    const PlacementPricing& p = model.pricing();
    const double cross = hsc_cross_copies(model.instances(), load, source_load, affinity, topology);
    return 2.0 * p.bytes_per_token * (cross / p.net_bandwidth + b.intra_copies / p.nvl_bandwidth) + b.compute_seconds;
}

size_t cheapest(const std::vector<double>& prices) {
    GRACE_CHECK_ARG(!prices.empty(), "cheapest: no candidate");
    size_t best = 0;
    for (size_t i = 1; i < prices.size(); ++i)
        if (prices[i] < prices[best] * (1 - 1e-9)) best = i;
    return best;
}

int replicate_priced(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                     const Topology& topology, const PlacementPricing& pricing, double* price,
                     const std::vector<double>& affinity) {
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
    double best_price = hsc_price(cost, load, source_load, affinity, topology);
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
        const double p = hsc_price(cost, load, source_load, affinity, topology);
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
        const bool seen =
            std::any_of(out.begin(), out.end(), [&](const Grouping& x) { return x.group_of == g.group_of; });
        if (!seen) out.push_back(std::move(g));
    }
    return out;
}

}  // namespace grace
