#include "grace/replan.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>

#include "grace/error.hpp"
#include "grace/replication.hpp"

namespace grace {

namespace {

// The best rewrite of one layer: largest gain; ties to the lower GPU, removed, then added expert.
struct LayerBest {
    double gain = 0;
    int gpu = -1, removed = -1, added = -1;
    bool valid() const { return gpu >= 0; }
};

// A layer being re-planned: its price model and which GPU holds which expert.
struct LayerState {
    std::vector<double> load;
    LayerCostModel cost;
    std::vector<char> holds;  // [G * E]
    LayerBest best;
};

LayerBest find_best(const LayerState& st, int E, int G) {
    LayerBest best;
    const double t0 = st.cost.time();
    const double tol = 1e-12 * std::abs(t0);
    std::vector<char> can_add(E, 1);
    std::vector<double> out;
    const auto& inst = st.cost.instances();
    for (int g = 0; g < G; ++g)
        for (int x = 0; x < E; ++x) {
            if (!st.holds[static_cast<size_t>(g) * E + x] || inst[x].size() < 2) continue;
            st.cost.swap_times(g, x, can_add, out);
            for (int y = 0; y < E; ++y) {
                if (!std::isfinite(out[y])) continue;
                const double gain = t0 - out[y];
                // Scan order (g, x, y) ascending: a later candidate wins only with a clearly larger gain.
                if (gain > tol && (!best.valid() || gain > best.gain + tol)) best = {gain, g, x, y};
            }
        }
    return best;
}

// Rewrites the slot of `removed` on `gpu` to `added` in the plan's lists; if it held removed's primary, the
// primary passes to its instance on the lowest GPU.
void apply_move(LayerPlan& lp, int gpu, int removed, int added) {
    auto& ex = lp.gpu_experts[gpu];
    ex.erase(std::find(ex.begin(), ex.end(), removed));
    ex.insert(std::upper_bound(ex.begin(), ex.end(), added), added);
    if (lp.primary_gpu[removed] == gpu)
        for (int g = 0; g < static_cast<int>(lp.gpu_experts.size()); ++g)
            if (std::binary_search(lp.gpu_experts[g].begin(), lp.gpu_experts[g].end(), removed)) {
                lp.primary_gpu[removed] = g;
                break;
            }
}

LayerState make_state(const LayerPlan& lp, std::vector<double> load, const std::vector<double>& sources, int E,
                      const Topology& topology, const PlacementPricing& pricing) {
    const int G = topology.num_gpus();
    std::vector<std::vector<int>> inst(E);
    std::vector<char> holds(static_cast<size_t>(G) * E, 0);
    for (int g = 0; g < G; ++g)
        for (int e : lp.gpu_experts[g]) {
            inst[e].push_back(g);
            holds[static_cast<size_t>(g) * E + e] = 1;
        }
    LayerCostModel cost(load, sources, inst, topology, pricing);
    return LayerState{std::move(load), std::move(cost), std::move(holds), {}};
}

}  // namespace

int refine_layer_priced(LayerPlan& layer, const std::vector<double>& load, const std::vector<double>& source_load,
                        int num_experts, const Topology& topology, const PlacementPricing& pricing, int max_moves) {
    const int E = num_experts, G = topology.num_gpus();
    GRACE_CHECK_ARG(static_cast<int>(load.size()) == E, "priced refinement: ", load.size(), " loads for ", E,
                    " experts");
    LayerState st = make_state(layer, load, source_load, E, topology, pricing);
    int moves = 0;
    while (max_moves < 0 || moves < max_moves) {
        const LayerBest b = find_best(st, E, G);
        if (!b.valid()) break;
        st.cost.swap(b.gpu, b.removed, b.added);
        st.holds[static_cast<size_t>(b.gpu) * E + b.removed] = 0;
        st.holds[static_cast<size_t>(b.gpu) * E + b.added] = 1;
        apply_move(layer, b.gpu, b.removed, b.added);
        ++moves;
    }
    if (moves > 0) build_routing_tables(layer, st.load, E, G);
    layer.num_priced_moves += moves;
    return moves;
}

ReplanResult replan(const ExpertPlan& old_plan, const RoutingStats& stats, const ReplanOptions& options) {
    old_plan.validate();
    stats.validate();
    const int E = old_plan.num_experts, L = old_plan.num_layers, G = old_plan.topology.num_gpus();
    GRACE_CHECK_ARG(stats.num_experts == E && stats.num_layers == L, "replan: the statistics have E=",
                    stats.num_experts, " L=", stats.num_layers, " but the plan has E=", E, " L=", L);
    GRACE_CHECK_ARG(options.max_moves >= 0 || options.max_bytes >= 0,
                    "replan needs a budget: a maximum number of moves or of bytes");
    GRACE_CHECK_ARG(std::isfinite(options.bytes_per_expert) && options.bytes_per_expert > 0,
                    "replan: bytes per expert must be > 0, got ", options.bytes_per_expert);
    GRACE_CHECK_ARG(options.max_bytes < 0 || std::isfinite(options.max_bytes), "replan: byte budget ",
                    options.max_bytes, " is not finite");
    GRACE_CHECK_ARG(options.num_threads >= 0, "num_threads must be >= 0, got ", options.num_threads);
    int64_t budget = options.max_moves >= 0 ? options.max_moves : std::numeric_limits<int64_t>::max();
    if (options.max_bytes >= 0)
        budget = std::min<int64_t>(budget, static_cast<int64_t>(std::floor(options.max_bytes /
                                                                            options.bytes_per_expert)));
    const bool have_sources = stats.num_gpus == G && !stats.source_load.empty();

    // One price model per layer, built (and its best first move found) in parallel over layers.
    std::vector<std::unique_ptr<LayerState>> layers(L);
    std::vector<std::exception_ptr> errors(L);
    const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int l = 0; l < L; ++l) {
        try {
            std::vector<double> load(E), sources;
            for (int e = 0; e < E; ++e) load[e] = static_cast<double>(stats.load_at(l, e));
            if (have_sources) {
                const int64_t* s = stats.source_load.data() + static_cast<size_t>(l) * G * E;
                sources.assign(s, s + static_cast<size_t>(G) * E);
            }
            layers[l] = std::make_unique<LayerState>(
                make_state(old_plan.layers[l], std::move(load), sources, E, old_plan.topology, options.pricing));
            layers[l]->best = find_best(*layers[l], E, G);
        } catch (...) {
            errors[l] = std::current_exception();
        }
    }
    for (int l = 0; l < L; ++l)
        if (errors[l]) std::rethrow_exception(errors[l]);

    ReplanResult r;
    r.time_before.resize(L);
    for (int l = 0; l < L; ++l) r.time_before[l] = layers[l]->cost.time();
    // Greedy over layers: the move with the largest gain anywhere (ties: lower layer); only the changed layer's
    // best move needs finding again.
    while (static_cast<int64_t>(r.moves.size()) < budget) {
        int pick = -1;
        for (int l = 0; l < L; ++l)
            if (layers[l]->best.valid() && (pick < 0 || layers[l]->best.gain > layers[pick]->best.gain)) pick = l;
        if (pick < 0) break;
        LayerState& st = *layers[pick];
        const LayerBest b = st.best;
        st.cost.swap(b.gpu, b.removed, b.added);
        st.holds[static_cast<size_t>(b.gpu) * E + b.removed] = 0;
        st.holds[static_cast<size_t>(b.gpu) * E + b.added] = 1;
        r.moves.push_back({pick, b.gpu, b.removed, b.added, b.gain});
        st.best = find_best(st, E, G);
    }
    r.bytes_moved = static_cast<double>(r.moves.size()) * options.bytes_per_expert;

    r.plan = old_plan;
    std::vector<char> changed(L, 0);
    for (const SlotMove& m : r.moves) {
        changed[m.layer] = 1;
        apply_move(r.plan.layers[m.layer], m.gpu, m.removed, m.added);
    }
    r.time_after.resize(L);
    for (int l = 0; l < L; ++l) {
        r.time_after[l] = layers[l]->cost.time();
        if (changed[l]) build_routing_tables(r.plan.layers[l], layers[l]->load, E, G);
    }
    r.plan.validate();
    return r;
}

}  // namespace grace
