#include "grace/replication.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <numeric>

#include "grace/eplb.hpp"
#include "grace/error.hpp"
#include "grace/placement_cost.hpp"
#include "grace/routing.hpp"

namespace grace {

namespace {

struct MethodName {
    ReplicationMethod method;
    const char* name;
};
constexpr MethodName kMethodNames[] = {{ReplicationMethod::kNone, "none"},
                                       {ReplicationMethod::kFixed, "fixed"},
                                       {ReplicationMethod::kDynamic, "dynamic"},
                                       {ReplicationMethod::kEplb, "eplb"},
                                       {ReplicationMethod::kDynamicIterative, "dynamic-iter"}};

// Which GPU holds which expert, and how many instances each GPU and expert has.
struct Holdings {
    int num_experts, num_gpus, cap;
    std::vector<char> holds;  // [G][E]
    std::vector<int> gpu_count, expert_count;

    Holdings(const LayerPlan& layer, int E, int G, int capacity)
        : num_experts(E),
          num_gpus(G),
          cap(capacity),
          holds(static_cast<size_t>(G) * E, 0),
          gpu_count(G, 0),
          expert_count(E, 0) {
        for (int g = 0; g < G; ++g)
            for (int e : layer.gpu_experts[g]) {
                GRACE_ASSERT(e >= 0 && e < E && !holds[static_cast<size_t>(g) * E + e]);
                holds[static_cast<size_t>(g) * E + e] = 1;
                ++gpu_count[g];
                ++expert_count[e];
            }
    }
    bool has(int g, int e) const { return holds[static_cast<size_t>(g) * num_experts + e] != 0; }
    bool can_take(int g, int e) const { return !has(g, e) && gpu_count[g] < cap; }
    void add(LayerPlan& layer, int g, int e) {
        holds[static_cast<size_t>(g) * num_experts + e] = 1;
        ++gpu_count[g];
        ++expert_count[e];
        layer.gpu_experts[g].push_back(e);
    }
};

// Eligible GPUs for a replica of e, best first: lowest `rank_load`, then on `home_node`, then lowest index.
std::vector<int> ranked_targets(const Holdings& h, int e, const std::vector<double>& rank_load, const Topology& topo,
                                int home_node) {
    std::vector<int> out;
    for (int g = 0; g < h.num_gpus; ++g)
        if (h.can_take(g, e)) out.push_back(g);
    std::sort(out.begin(), out.end(), [&](int a, int b) {
        if (rank_load[a] != rank_load[b]) return rank_load[a] < rank_load[b];
        const bool na = topo.node_of(a) == home_node, nb = topo.node_of(b) == home_node;
        if (na != nb) return na;
        return a < b;
    });
    return out;
}

void check_load(const std::vector<double>& load, int num_experts) {
    GRACE_CHECK_ARG(static_cast<int>(load.size()) == num_experts, "replication: load has ", load.size(),
                    " entries, expected ", num_experts);
    for (int e = 0; e < num_experts; ++e)
        GRACE_CHECK_ARG(std::isfinite(load[e]) && load[e] >= 0, "replication: load[", e, "] = ", load[e],
                        " is negative or not finite");
}

}  // namespace

std::string to_string(ReplicationMethod method) {
    for (const auto& m : kMethodNames)
        if (m.method == method) return m.name;
    return "?";
}

ReplicationMethod parse_replication_method(const std::string& name) {
    for (const auto& m : kMethodNames)
        if (name == m.name) return m.method;
    GRACE_CHECK_ARG(false, "unknown replication method '", name, "' (expected none, fixed, dynamic, dynamic-iter or eplb)");
    return ReplicationMethod::kNone;
}

std::vector<double> primary_gpu_loads(const std::vector<double>& load, const std::vector<int>& primary_gpu,
                                      int num_gpus) {
    std::vector<double> out(num_gpus, 0.0);
    for (size_t e = 0; e < primary_gpu.size() && e < load.size(); ++e) out[primary_gpu[e]] += load[e];
    return out;
}

double load_skew(const std::vector<double>& gpu_load) {
    if (gpu_load.empty()) return 1.0;
    double sum = 0, mx = 0;
    for (double x : gpu_load) {
        sum += x;
        mx = std::max(mx, x);
    }
    if (sum <= 0) return 1.0;
    return mx / (sum / static_cast<double>(gpu_load.size()));
}

int replica_count(double gamma, int num_gpus) {
    if (!std::isfinite(gamma)) return std::max(0, num_gpus - 1);
    double c = std::ceil(gamma);
    if (gamma - std::floor(gamma) < 1e-9) c = std::floor(gamma);
    const int r = static_cast<int>(std::min<double>(num_gpus - 1, c - 1));
    return std::max(0, r);
}

std::vector<int> hot_experts(const std::vector<double>& load, const std::vector<int>& primary_gpu,
                             const std::vector<double>& gpu_load, int heavy_gpu, int num_replicas) {
    if (num_replicas <= 0 || gpu_load.empty()) return {};
    std::vector<int> members;
    for (size_t e = 0; e < primary_gpu.size(); ++e)
        if (primary_gpu[e] == heavy_gpu) members.push_back(static_cast<int>(e));
    std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return load[a] > load[b]; });
    const double mean = std::accumulate(gpu_load.begin(), gpu_load.end(), 0.0) / static_cast<double>(gpu_load.size());
    const double target = (gpu_load[heavy_gpu] - mean) * (num_replicas + 1) / num_replicas;
    std::vector<int> hot;
    double cum = 0;
    for (int e : members) {
        hot.push_back(e);
        cum += load[e];
        if (cum >= target) break;
    }
    return hot;
}

std::vector<double> predict_gpu_loads(const LayerPlan& layer, const std::vector<double>& load, int num_gpus) {
    std::vector<int> count(load.size(), 0);
    for (const auto& ex : layer.gpu_experts)
        for (int e : ex) ++count[e];
    std::vector<double> out(num_gpus, 0.0);
    for (int g = 0; g < num_gpus && g < static_cast<int>(layer.gpu_experts.size()); ++g)
        for (int e : layer.gpu_experts[g]) out[g] += load[e] / count[e];
    return out;
}

void replicate_layer(LayerPlan& layer, const std::vector<double>& load, const Topology& topology,
                     const ReplicationOptions& options) {
    const int E = static_cast<int>(layer.primary_gpu.size());
    const int G = topology.num_gpus();
    check_load(load, E);
    GRACE_ASSERT(static_cast<int>(layer.gpu_experts.size()) == G);
    const int cap = topology.slots_per_gpu ? *topology.slots_per_gpu : INT_MAX;
    Holdings h(layer, E, G, cap);

    const std::vector<double> base = primary_gpu_loads(load, layer.primary_gpu, G);
    layer.gpu_load_before = base;
    layer.gamma = load_skew(base);
    layer.num_replicas = 0;
    layer.hot_experts.clear();
    const int heavy = static_cast<int>(std::max_element(base.begin(), base.end()) - base.begin());
    const int R = replica_count(layer.gamma, G);

    switch (options.method) {
        case ReplicationMethod::kNone:
            break;
        case ReplicationMethod::kDynamic: {
            layer.num_replicas = R;
            layer.hot_experts = hot_experts(load, layer.primary_gpu, base, heavy, R);
            std::vector<double> pred = base;
            for (int e : layer.hot_experts) {
                const std::vector<int> targets = ranked_targets(h, e, pred, topology, topology.node_of(heavy));
                const int n = std::min<int>(R, static_cast<int>(targets.size()));
                const double share = load[e] / (n + 1);
                for (int i = 0; i < n; ++i) {
                    h.add(layer, targets[i], e);
                    pred[targets[i]] += share;
                }
                pred[heavy] -= load[e] - share;
            }
            break;
        }
        case ReplicationMethod::kDynamicIterative: {
            // Every round gives the currently heaviest GPU the DR treatment, with loads predicted from all
            // instances so far (each instance of e takes load[e] / count). Bounded by G rounds.
            const int rounds = options.max_rounds > 0 ? std::min(options.max_rounds, G) : G;
            for (int round = 0; round < rounds; ++round) {
                std::vector<double> pred = predict_gpu_loads(layer, load, G);
                const double skew = load_skew(pred);
                auto spread = [](const std::vector<double>& x) {
                    double sq = 0;
                    for (double v : x) sq += v * v;
                    return sq;
                };
                const double spread_before = spread(pred);
                // A round that does not lower the spread of the predicted loads (their sum of squares; the total is
                // fixed) is undone, and the rounds stop.
                const Holdings saved_holdings = h;
                const std::vector<std::vector<int>> saved_experts = layer.gpu_experts;
                const std::vector<int> saved_hot = layer.hot_experts;
                if (skew <= options.target_skew) break;
                const int hot_gpu = static_cast<int>(std::max_element(pred.begin(), pred.end()) - pred.begin());
                const int r = replica_count(skew, G);
                if (r <= 0) break;
                // The heavy GPU's experts by the load share they bring it, heaviest first; the shortest prefix
                // reaching (L_max - L_mean)(R+1)/R is the round's hot set (spec §4's rule).
                std::vector<int> members = layer.gpu_experts[hot_gpu];
                auto share_of = [&](int e) { return load[e] / h.expert_count[e]; };
                std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return share_of(a) > share_of(b); });
                const double mean = std::accumulate(pred.begin(), pred.end(), 0.0) / G;
                const double need = (pred[hot_gpu] - mean) * (r + 1) / r;
                int added = 0;
                double cum = 0;
                for (int e : members) {
                    if (cum >= need) break;
                    cum += share_of(e);
                    const std::vector<int> targets = ranked_targets(h, e, pred, topology, topology.node_of(hot_gpu));
                    const int n = std::min<int>(r, static_cast<int>(targets.size()));
                    if (n == 0) continue;
                    const int before = h.expert_count[e];
                    for (int g = 0; g < G; ++g)
                        if (h.has(g, e)) pred[g] -= load[e] / before - load[e] / (before + n);
                    for (int i = 0; i < n; ++i) {
                        h.add(layer, targets[i], e);
                        pred[targets[i]] += load[e] / (before + n);
                    }
                    added += n;
                    if (std::find(layer.hot_experts.begin(), layer.hot_experts.end(), e) == layer.hot_experts.end())
                        layer.hot_experts.push_back(e);
                }
                if (added == 0) break;
                if (round > 0 && spread(pred) >= spread_before * (1 - 1e-12)) {
                    h = saved_holdings;
                    layer.gpu_experts = saved_experts;
                    layer.hot_experts = saved_hot;
                    break;
                }
                if (round == 0) layer.num_replicas = r;
                if (options.after_round) options.after_round(layer);
            }
            break;
        }
        case ReplicationMethod::kFixed: {
            layer.num_replicas = R > 0 ? 1 : 0;
            layer.hot_experts = hot_experts(load, layer.primary_gpu, base, heavy, R);
            for (int e : layer.hot_experts) {
                const std::vector<int> targets = ranked_targets(h, e, base, topology, topology.node_of(heavy));
                if (!targets.empty()) h.add(layer, targets[0], e);
            }
            break;
        }
        case ReplicationMethod::kEplb: {
            int budget = options.eplb_slots;
            if (budget <= 0) budget = cap != INT_MAX ? G * cap : G * ((E + G - 1) / G + 1);
            GRACE_CHECK_ARG(budget >= E, "replication eplb:", budget, " has fewer slots than the ", E, " experts");
            std::vector<int> phy2log, rank, logcnt;
            replicate_experts(load, budget, phy2log, rank, logcnt);
            std::vector<double> pred = base;
            for (int p = E; p < budget; ++p) {
                int e = phy2log[p];
                std::vector<int> targets = ranked_targets(h, e, pred, topology, topology.node_of(layer.primary_gpu[e]));
                if (targets.empty()) {
                    // Every GPU already holds e or is full: the slot goes to the placeable expert with the highest
                    // load per instance (water-filling restricted to what the constraints allow).
                    int best = -1;
                    double best_v = -1;
                    for (int x = 0; x < E; ++x) {
                        const double v = load[x] / h.expert_count[x];
                        if (v <= best_v) continue;
                        bool placeable = false;
                        for (int g = 0; g < G && !placeable; ++g) placeable = h.can_take(g, x);
                        if (placeable) best_v = v, best = x;
                    }
                    if (best < 0) break;  // no free slot anywhere
                    e = best;
                    targets = ranked_targets(h, e, pred, topology, topology.node_of(layer.primary_gpu[e]));
                }
                const int n = h.expert_count[e];
                for (int g = 0; g < G; ++g)
                    if (h.has(g, e)) pred[g] -= load[e] / n - load[e] / (n + 1);
                h.add(layer, targets[0], e);
                pred[targets[0]] += load[e] / (n + 1);
            }
            for (int e = 0; e < E; ++e) {
                if (h.expert_count[e] > 1) layer.hot_experts.push_back(e);
                layer.num_replicas = std::max(layer.num_replicas, h.expert_count[e] - 1);
            }
            break;
        }
    }
    for (auto& ex : layer.gpu_experts) std::sort(ex.begin(), ex.end());
}

void build_routing_tables(LayerPlan& layer, const std::vector<double>& load, int num_experts, int num_gpus) {
    layer.instance_gpus.clear();
    layer.wrr_weights.clear();
    layer.finalize(num_experts);
    layer.predicted_gpu_load = predict_gpu_loads(layer, load, num_gpus);
    double mean = 0;
    for (double x : layer.predicted_gpu_load) mean += x;
    mean = num_gpus > 0 ? mean / num_gpus : 0;
    const double floor_load = std::max(mean * 1e-9, 1e-300);
    for (int e = 0; e < num_experts; ++e) {
        const auto& inst = layer.instance_gpus[e];
        GRACE_CHECK_ARG(static_cast<int>(inst.size()) <= layer.wrr_period, "expert ", e, " has ", inst.size(),
                        " instances but the WRR period is only ", layer.wrr_period);
        if (inst.size() == 1) {
            layer.wrr_weights[e] = {layer.wrr_period};
            continue;
        }
        std::vector<double> w(inst.size());
        for (size_t j = 0; j < inst.size(); ++j) w[j] = 1.0 / std::max(layer.predicted_gpu_load[inst[j]], floor_load);
        layer.wrr_weights[e] = round_weights(w, layer.wrr_period);
    }
}

int pad_to_equal_slots(LayerPlan& layer, const std::vector<double>& load, int num_experts, const Topology& topology,
                       int target) {
    const int G = topology.num_gpus();
    check_load(load, num_experts);
    const int cap = topology.slots_per_gpu ? *topology.slots_per_gpu : INT_MAX;
    Holdings h(layer, num_experts, G, INT_MAX);
    for (int c : h.gpu_count) target = std::max(target, c);
    GRACE_CHECK_ARG(target <= num_experts, "cannot pad to ", target, " slots per GPU with only ", num_experts,
                    " experts (no GPU may hold an expert twice)");
    GRACE_CHECK_ARG(target <= cap, "cannot pad to ", target, " slots per GPU: the topology has only ", cap);
    int added = 0;
    for (;;) {
        const int g = static_cast<int>(std::min_element(h.gpu_count.begin(), h.gpu_count.end()) - h.gpu_count.begin());
        if (h.gpu_count[g] >= target) break;
        int best = -1;
        double best_v = -1;
        for (int e = 0; e < num_experts; ++e) {
            if (h.has(g, e)) continue;
            const double v = load[e] / h.expert_count[e];
            if (v > best_v) {
                best_v = v;
                best = e;
            }
        }
        GRACE_ASSERT(best >= 0);
        h.add(layer, g, best);
        ++added;
    }
    for (auto& ex : layer.gpu_experts) std::sort(ex.begin(), ex.end());
    build_routing_tables(layer, load, num_experts, G);
    return added;
}

int fill_free_slots(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                    int num_experts, const Topology& topology, const PlacementPricing& pricing) {
    const int E = num_experts, G = topology.num_gpus();
    check_load(load, E);
    GRACE_CHECK_ARG(topology.slots_per_gpu.has_value(), "slot-exact fill needs a slot count per GPU");
    const int S = *topology.slots_per_gpu;
    GRACE_CHECK_ARG(S <= E, "cannot give every GPU ", S, " slots with only ", E,
                    " experts (no GPU may hold an expert twice)");
    Holdings h(layer, E, G, S);
    for (int g = 0; g < G; ++g)
        GRACE_CHECK_ARG(h.gpu_count[g] <= S, "layer ", layer.layer, ": GPU ", g, " already holds ", h.gpu_count[g],
                        " instances, more than its ", S, " slots");
    std::vector<std::vector<int>> instances(E);
    for (int g = 0; g < G; ++g)
        for (int e : layer.gpu_experts[g]) instances[e].push_back(g);
    LayerCostModel cost(load, source_load, instances, topology, pricing);
    std::vector<char> free_gpu(G);
    std::vector<double> times, means, bounds;
    std::vector<std::pair<double, int>> order;  // (lower bound, expert)
    int added = 0;
    for (;;) {
        for (int g = 0; g < G; ++g) free_gpu[g] = h.gpu_count[g] < S;
        if (std::none_of(free_gpu.begin(), free_gpu.end(), [](char c) { return c != 0; })) break;
        // The replica that gives the lowest priced layer time; ties (within 1e-12 relative: sums in another
        // order) go to the lower mean-based price, then the lower expert id, then the lower GPU. Experts are tried
        // in order of their lower bound time_without(e), stopping once the bound exceeds the best time found: the
        // result is the same as trying them all.
        order.clear();
        cost.times_without(bounds);
        for (int e = 0; e < E; ++e) order.emplace_back(bounds[e], e);
        std::sort(order.begin(), order.end());
        int best_e = -1, best_g = -1;
        double best_t = std::numeric_limits<double>::infinity(), best_m = best_t;
        for (const auto& [bound, e] : order) {
            if (best_e >= 0 && bound > best_t + 1e-12 * std::abs(best_t)) break;
            cost.times_with(e, free_gpu, times, means);
            for (int g = 0; g < G; ++g) {
                if (!std::isfinite(times[g])) continue;
                const double tol = 1e-12 * std::max(std::abs(best_t), std::abs(times[g]));
                bool better = best_e < 0 || times[g] < best_t - tol;
                if (!better && times[g] <= best_t + tol) {
                    const double mtol = 1e-12 * std::max(std::abs(best_m), std::abs(means[g]));
                    better = means[g] < best_m - mtol ||
                             (means[g] <= best_m + mtol && (e < best_e || (e == best_e && g < best_g)));
                }
                if (better) best_t = times[g], best_m = means[g], best_e = e, best_g = g;
            }
        }
        GRACE_ASSERT(best_e >= 0);  // S <= E: a GPU with a free slot lacks some expert
        cost.add(best_e, best_g);
        h.add(layer, best_g, best_e);
        ++added;
    }
    for (auto& ex : layer.gpu_experts) std::sort(ex.begin(), ex.end());
    layer.num_fill_replicas += added;
    build_routing_tables(layer, load, E, G);
    return added;
}

}  // namespace grace
