#include "grace/planner.hpp"

#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <exception>
#include <limits>
#include <map>
#include <tuple>
#include <sstream>

#include "core/rng.hpp"
#include "grace/eplb.hpp"
#include "grace/error.hpp"
#include "grace/grouping.hpp"
#include "grace/priced_search.hpp"
#include "grace/replan.hpp"
#include "grace/replication.hpp"
#include "grace/routing.hpp"

namespace grace {

namespace {

constexpr const char* kGroupings[] = {
    "vanilla",           "occult",      "c2r",   "spectral-full", "spectral-controlled", "hierarchical", "metis",
    "eplb-hierarchical", "eplb-global", "priced"};
constexpr const char* kReplications[] = {"none", "fixed", "dynamic", "dynamic-iter", "eplb", "priced"};

std::string join_names(const char* const* names, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::string(names[i]);
    return s;
}

std::string format_ratio(double r) {
    std::ostringstream os;
    os.precision(6);
    os << r;
    return os.str();
}

// Splits "name:param" into name and (possibly empty) param.
std::pair<std::string, std::string> split_param(const std::string& s) {
    const size_t c = s.find(':');
    if (c == std::string::npos) return {s, ""};
    return {s.substr(0, c), s.substr(c + 1)};
}

// ---- group -> GPU mapping ------------------------------------------------------------------------------------

// Maps the G groups of a flat grouping to GPUs: groups are packed onto nodes (M per node) to maximize the
// affinity kept inside nodes (greedy growth from the most connected free group, then improving swaps); inside
// a node, groups go to local GPUs in ascending group order. Returns gpu_of_group.
std::vector<int> place_groups_on_nodes(const std::vector<double>& a, int E, const Grouping& grouping,
                                       const Topology& topo) {
    const int G = topo.num_gpus(), N = topo.nodes, M = topo.gpus_per_node;
    std::vector<int> gpu_of(G);
    for (int g = 0; g < G; ++g) gpu_of[g] = g;
    if (N == 1 || M == 1) return gpu_of;
    std::vector<double> b(static_cast<size_t>(G) * G, 0.0);
    for (int i = 0; i < E; ++i) {
        const int gi = grouping.group_of[i];
        const double* row = a.data() + static_cast<size_t>(i) * E;
        for (int j = 0; j < E; ++j) b[static_cast<size_t>(gi) * G + grouping.group_of[j]] += row[j];
    }
    auto B = [&](int x, int y) { return b[static_cast<size_t>(x) * G + y]; };
    std::vector<int> node_of(G, -1);
    for (int n = 0; n < N; ++n) {
        int seed = -1;
        double best = -1;
        for (int x = 0; x < G; ++x) {
            if (node_of[x] >= 0) continue;
            double s = 0;
            for (int y = 0; y < G; ++y)
                if (y != x && node_of[y] < 0) s += B(x, y);
            if (s > best) best = s, seed = x;
        }
        node_of[seed] = n;
        std::vector<double> gain(G, 0.0);
        for (int y = 0; y < G; ++y) gain[y] = B(seed, y);
        for (int k = 1; k < M; ++k) {
            int pick = -1;
            double pv = -1;
            for (int y = 0; y < G; ++y)
                if (node_of[y] < 0 && gain[y] > pv) pv = gain[y], pick = y;
            node_of[pick] = n;
            for (int y = 0; y < G; ++y) gain[y] += B(pick, y);
        }
    }
    // Improving swaps between nodes (first improvement, bounded sweeps).
    double total = 0;
    for (double x : b) total += x;
    const double eps = 1e-12 * std::max(total, 1.0);
    for (int sweep = 0; sweep < 50; ++sweep) {
        bool improved = false;
        for (int x = 0; x < G; ++x)
            for (int y = x + 1; y < G; ++y) {
                const int nx = node_of[x], ny = node_of[y];
                if (nx == ny) continue;
                double gain = 0;
                for (int z = 0; z < G; ++z) {
                    if (z == x || z == y) continue;
                    if (node_of[z] == ny) gain += B(x, z) - B(y, z);
                    if (node_of[z] == nx) gain += B(y, z) - B(x, z);
                }
                if (gain > eps) {
                    std::swap(node_of[x], node_of[y]);
                    improved = true;
                }
            }
        if (!improved) break;
    }
    std::vector<int> next_local(N, 0);
    for (int g = 0; g < G; ++g) gpu_of[g] = topo.gpu_at(node_of[g], next_local[node_of[g]]++);
    return gpu_of;
}

// ---- one layer ----------------------------------------------------------------------------------------------

struct LayerInput {
    int layer;
    std::vector<double> affinity;  // [E, E]
    std::vector<double> load;      // [E]
    std::vector<double> source_load;  // [G, E] when the statistics were profiled on this topology, else empty
    // hg_level2's grouping of one node's experts, by (node, seed, slot cap, the node's expert ids): the level-1
    // candidates of a layer share most of their nodes, and the grouping is a function of these alone.
    mutable std::map<std::tuple<int, uint64_t, int, std::vector<int>>, Grouping> level2_memo;
};

// Slot-exact plans (spec §4): replication methods that choose replicas fill every free slot; "none" keeps the
// primaries alone and EPLB's water-filling already spends its own slot budget.
bool fills_slots(const MethodSpec& spec, const Topology& topo, const PlanOptions& options) {
    return topo.slots_per_gpu && options.fill_slots && spec.replication != "none" && spec.replication != "eplb";
}

// Whether the layer is priced anywhere (the slot-exact fill, or a priced grouping or replication).
bool uses_pricing(const MethodSpec& spec, const Topology& topo, const PlanOptions& options) {
    return fills_slots(spec, topo, options) || spec.grouping == "priced" || spec.replication == "priced";
}

std::vector<double> sub_matrix(const std::vector<double>& a, int E, const std::vector<int>& ids) {
    const int n = static_cast<int>(ids.size());
    std::vector<double> s(static_cast<size_t>(n) * n);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) s[static_cast<size_t>(i) * n + j] = a[static_cast<size_t>(ids[i]) * E + ids[j]];
    return s;
}

// Number of EPLB expert groups for the hierarchical policy: one per GPU when E splits evenly, else one per node.
int eplb_num_groups(int E, const Topology& topo, bool hierarchical) {
    if (!hierarchical) return 1;
    if (E % topo.num_gpus() == 0) return topo.num_gpus();
    if (E % topo.nodes == 0) return topo.nodes;
    return 1;  // falls back to EPLB's global policy
}

// EPLB may place two replicas of one expert on one GPU, which grace.plan/v1 forbids. Each such duplicate is
// swapped with a replica x on another GPU h such that h lacks e and the duplicate's GPU lacks x, choosing the
// x whose load per replica is closest to e's (ties: lower GPU, then lower slot), so GPU loads barely change.
// A duplicate with no such swap becomes -1 (dropped). phy2log is [P] with per_gpu slots per GPU.
void repair_eplb_duplicates(std::vector<int>& phy2log, const std::vector<int>& logcnt, const std::vector<double>& load,
                            int G, int per_gpu) {
    auto on_gpu = [&](int g, int e) {
        for (int i = 0; i < per_gpu; ++i)
            if (phy2log[static_cast<size_t>(g) * per_gpu + i] == e) return true;
        return false;
    };
    auto per_replica = [&](int e) { return load[e] / std::max(1, logcnt[e]); };
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < per_gpu; ++i) {
            const size_t p = static_cast<size_t>(g) * per_gpu + i;
            const int e = phy2log[p];
            bool dup = false;
            for (int j = 0; j < i && !dup; ++j) dup = phy2log[static_cast<size_t>(g) * per_gpu + j] == e;
            if (!dup) continue;
            size_t best = SIZE_MAX;
            double best_cost = 0;
            for (int h = 0; h < G; ++h) {
                if (h == g || on_gpu(h, e)) continue;
                for (int j = 0; j < per_gpu; ++j) {
                    const size_t q = static_cast<size_t>(h) * per_gpu + j;
                    const int x = phy2log[q];
                    if (x < 0 || on_gpu(g, x)) continue;
                    const double cost = std::abs(per_replica(x) - per_replica(e));
                    if (best == SIZE_MAX || cost < best_cost) best = q, best_cost = cost;
                }
            }
            if (best == SIZE_MAX)
                phy2log[p] = -1;
            else
                std::swap(phy2log[p], phy2log[best]);
        }
}

// Replication as the spec names it; "priced" searches the DR rounds by price (priced_search.hpp). Returns the
// layer's price when the search computed it, else NaN.
double replicate_by_spec(LayerPlan& lp, const LayerInput& in, const Topology& topo, const MethodSpec& spec,
                         const PlanOptions& options) {
    if (spec.replication == "priced") {
        double price = 0;
        replicate_priced(lp, in.load, in.source_load, topo, options.pricing, &price, in.affinity);
        return price;
    }
    ReplicationOptions ro;
    ro.method = parse_replication_method(spec.replication);
    ro.eplb_slots = spec.replication_slots;
    replicate_layer(lp, in.load, topo, ro);
    return std::numeric_limits<double>::quiet_NaN();
}

// What the priced choices judge a placement by: hsc_price (HSC's cross-node copies estimated from the affinity).
double layer_price(const LayerPlan& lp, const LayerInput& in, const Topology& topo, const PlanOptions& options) {
    const int E = static_cast<int>(in.load.size());
    std::vector<std::vector<int>> inst(E);
    for (int g = 0; g < topo.num_gpus(); ++g)
        for (int e : lp.gpu_experts[g]) inst[e].push_back(g);
    const LayerCostModel model(in.load, in.source_load, inst, topo, options.pricing);
    return hsc_price(model, in.load, in.source_load, in.affinity, topo);
}

// Slot-exact plans: the priced fill of every free slot, then at most options.priced_moves priced rewrites.
void fill_and_refine(LayerPlan& lp, const LayerInput& in, int E, const Topology& topo, const MethodSpec& spec,
                     const PlanOptions& options) {
    if (!fills_slots(spec, topo, options)) return;
    fill_free_slots(lp, in.load, in.source_load, E, topo, options.pricing);
    if (options.priced_moves != 0)
        refine_layer_priced(lp, in.load, in.source_load, E, topo, options.pricing, options.priced_moves);
}

// Puts every expert's primary on gpu_of_expert[e]; refuses a GPU over its slot count.
void set_primaries(LayerPlan& lp, const std::vector<int>& gpu_of_expert, int cap, const std::string& grouping) {
    const int E = static_cast<int>(gpu_of_expert.size()), G = static_cast<int>(lp.gpu_experts.size());
    for (auto& ex : lp.gpu_experts) ex.clear();
    for (int e = 0; e < E; ++e) {
        GRACE_ASSERT(gpu_of_expert[e] >= 0 && gpu_of_expert[e] < G);
        lp.primary_gpu[e] = gpu_of_expert[e];
        lp.gpu_experts[gpu_of_expert[e]].push_back(e);
    }
    for (int g = 0; g < G; ++g)
        GRACE_CHECK_ARG(cap == 0 || static_cast<int>(lp.gpu_experts[g].size()) <= cap, "layer ", lp.layer,
                        ": grouping '", grouping, "' put ", lp.gpu_experts[g].size(), " experts on GPU ", g,
                        ", more than its ", cap, " slots");
}

// HG's level-1 (node) grouping as the paper has it: fully non-uniform spectral clustering into N groups of at least
// M experts and at most the node's slots.
Grouping hg_node_split(const LayerInput& in, int E, const Topology& topo, const SpectralOptions& so, int cap) {
    Grouping nodes;
    if (topo.nodes == 1) {
        nodes.num_groups = 1;
        nodes.group_of.assign(E, 0);
        return nodes;
    }
    const int M = topo.gpus_per_node;
    return spectral_grouping(in.affinity, E, topo.nodes, so, M, cap > 0 ? M * cap : 0);
}

// HG level 2 for one level-1 split: each node's experts, their affinity sub-matrix and their fully non-uniform
// spectral grouping into the node's M GPUs (computed once, shared by every level-2 choice).
struct HgLevel2 {
    std::vector<std::vector<int>> ids;
    std::vector<std::vector<double>> sub;
    std::vector<Grouping> full;
};

HgLevel2 hg_level2(const LayerInput& in, int E, const Topology& topo, const Grouping& nodes, uint64_t seed, int cap) {
    const int N = topo.nodes, M = topo.gpus_per_node;
    HgLevel2 h;
    h.ids = nodes.members();
    h.sub.resize(N);
    h.full.resize(N);
    for (int n = 0; n < N; ++n) {
        const int ni = static_cast<int>(h.ids[n].size());
        if (M == 1) {
            h.full[n].num_groups = 1;
            h.full[n].group_of.assign(ni, 0);
            continue;
        }
        h.sub[n] = sub_matrix(in.affinity, E, h.ids[n]);
        std::tuple<int, uint64_t, int, std::vector<int>> key{n, seed, cap, h.ids[n]};
        auto it = in.level2_memo.find(key);
        if (it == in.level2_memo.end()) {
            SpectralOptions so;
            so.seed = mix64(seed, static_cast<uint64_t>(in.layer), static_cast<uint64_t>(n) + 1);
            it = in.level2_memo.emplace(std::move(key), spectral_grouping(h.sub[n], ni, M, so, 1, cap)).first;
        }
        h.full[n] = it->second;
    }
    return h;
}

// Level-2 choices: the knee point (the paper), the fully non-uniform grouping as it is, or a ratio >= 0.
constexpr double kLevel2Knee = -1, kLevel2Full = -2;

// Assigns every expert a GPU from the level-2 grouping of its node under `mode`; with the knee, records the
// curves and the mean r* in lp.
std::vector<int> hg_assign(const HgLevel2& h, int E, const Topology& topo, double mode, int cap, bool refine,
                           LayerPlan& lp) {
    const int N = topo.nodes, M = topo.gpus_per_node;
    std::vector<int> gpu_of_expert(E, -1);
    lp.knee_curves.assign(N, {});
    double r_sum = 0;
    int r_count = 0;
    for (int n = 0; n < N; ++n) {
        const std::vector<int>& ids = h.ids[n];
        const int ni = static_cast<int>(ids.size());
        Grouping local = h.full[n];
        if (M > 1 && mode == kLevel2Knee) {
            KneeResult knee = knee_grouping(h.sub[n], ni, h.full[n], cap, refine, true);
            lp.knee_curves[n] = std::move(knee.curve);
            r_sum += knee.r_star;
            ++r_count;
            local = std::move(knee.grouping);
        } else if (M > 1 && mode >= 0) {
            const auto [lo, hi] = controlled_bounds(ni, M, mode, cap);
            local = controlled_grouping(h.sub[n], ni, h.full[n], lo, hi, refine);
            r_sum += mode;
            ++r_count;
        }
        for (int i = 0; i < ni; ++i) gpu_of_expert[ids[i]] = topo.gpu_at(n, local.group_of[i]);
    }
    lp.r_star = r_count ? r_sum / r_count : -1;
    return gpu_of_expert;
}

// METIS's grouping into `groups` GPUs with every GPU holding 1..cap experts (cap 0 = E): METIS balances load,
// not counts, so a grouping outside those sizes is repaired by controlled_grouping. max_edges_per_vertex: see
// metis_grouping.
Grouping repaired_metis_grouping(const LayerInput& in, int E, int groups, int cap, uint64_t seed,
                                 int max_edges_per_vertex = 0) {
    Grouping g = metis_grouping(in.affinity, in.load, E, groups, seed, 1.03, max_edges_per_vertex);
    bool repair = false;
    for (int s : g.sizes()) repair = repair || s == 0 || (cap > 0 && s > cap);
    if (repair) g = controlled_grouping(in.affinity, E, g, 1, cap > 0 ? cap : E, false);
    return g;
}

// The `priced` grouping (priced_search.hpp): every candidate placement gets the spec's replication and is priced
// whole; the cheapest is kept (ties to the earlier: the paper's HG first). Candidates: each level-1 split of
// node_split_candidates with the knee at level 2; then, on the best split, level 2 uniform (r = 0) and fully
// non-uniform; then Occult's equal-size groups and METIS's load-balanced groups (where grace has METIS), packed
// onto nodes. Slot-exact plans: the paper's split also gets the
// paper's DR and the iterated DR as candidates, and the three cheapest are filled and judged after the fill.
void plan_priced_layer(LayerPlan& lp, const LayerInput& in, int E, const Topology& topo, const MethodSpec& spec,
                       const PlanOptions& options, const SpectralOptions& so) {
    const int M = topo.gpus_per_node, cap = topo.slots_per_gpu ? *topo.slots_per_gpu : 0;
    // Every candidate with its price before any fill; a candidate counts as cheaper only by more than a relative
    // 1e-9 (cheapest()'s rule), so ties keep the earlier one.
    std::vector<std::pair<LayerPlan, double>> pool;
    double best_price = std::numeric_limits<double>::infinity();
    const bool slot_exact = fills_slots(spec, topo, options);
    // `replication` overrides the spec's (empty: the spec's). Returns whether the candidate is the cheapest so far.
    auto consider = [&](const std::vector<int>& gpu_of_expert, LayerPlan cand, const std::string& replication = "") {
        set_primaries(cand, gpu_of_expert, cap, spec.grouping);
        MethodSpec rs = spec;
        if (!replication.empty()) rs.replication = replication;
        double price = replicate_by_spec(cand, in, topo, rs, options);
        if (std::isnan(price)) price = layer_price(cand, in, topo, options);
        pool.emplace_back(std::move(cand), price);
        if (cheapest({best_price, price}) == 1) {
            best_price = price;
            return true;
        }
        return false;
    };
    const Grouping spectral = hg_node_split(in, E, topo, so, cap);
    const std::vector<Grouping> splits =
        topo.nodes == 1 ? std::vector<Grouping>{spectral}
                        : node_split_candidates(in.affinity, E, spectral, M, cap > 0 ? M * cap : 0);
    HgLevel2 best_split;
    for (const Grouping& nodes : splits) {
        HgLevel2 h = hg_level2(in, E, topo, nodes, options.seed, cap);
        LayerPlan cand = lp;
        const std::vector<int> gpu_of = hg_assign(h, E, topo, kLevel2Knee, cap, options.refine, cand);
        const bool first = best_split.ids.empty();
        if (first && slot_exact && spec.replication == "priced") {
            // After a fill the round count chosen before it need not be the best: the paper's DR and the iterated
            // DR on the paper's split are priced, filled, as well.
            consider(gpu_of, cand, "dynamic");
            consider(gpu_of, cand, "dynamic-iter");
        }
        if (consider(gpu_of, std::move(cand)) || first) best_split = std::move(h);
    }
    if (M > 1)
        for (double mode : {0.0, kLevel2Full}) {
            LayerPlan cand = lp;
            const std::vector<int> gpu_of = hg_assign(best_split, E, topo, mode, cap, options.refine, cand);
            consider(gpu_of, std::move(cand));
        }
    if (topo.num_gpus() > 1) {
        // Flat groupings, one group per GPU, packed onto nodes by affinity: Occult's equal-size groups and METIS's
        // load-balanced min-cut (sizes repaired to 1..cap, as the `metis` method does).
        auto consider_flat = [&](const Grouping& g) {
            const std::vector<int> gpu_of_group = place_groups_on_nodes(in.affinity, E, g, topo);
            std::vector<int> gpu_of(E);
            for (int e = 0; e < E; ++e) gpu_of[e] = gpu_of_group[g.group_of[e]];
            LayerPlan cand = lp;
            cand.knee_curves.clear();
            cand.r_star = -1;
            consider(gpu_of, std::move(cand));
        };
        consider_flat(occult_grouping(in.affinity, E, topo.num_gpus()));
        // The search's METIS sees each expert's kMetisEdges heaviest edges only: on the dense affinity graph METIS's
        // refinement was most of the planning time (48 x 128 on 4x8: 0.6 of 1.4 s CPU with every edge).
        constexpr int kMetisEdges = 16;
        if (metis_available())
            consider_flat(repaired_metis_grouping(in, E, topo.num_gpus(), cap, so.seed, kMetisEdges));
    }
    std::vector<double> prices;
    for (const auto& c : pool) prices.push_back(c.second);
    size_t pick = cheapest(prices);
    if (slot_exact) {
        // A slot-exact plan is judged as deployed, after its priced fill; filling is the costly part, so only the
        // kSlotFinalists candidates cheapest before the fill are filled (ties: the earlier).
        constexpr size_t kSlotFinalists = 3;
        std::vector<size_t> order(pool.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return prices[x] < prices[y]; });
        if (order.size() > kSlotFinalists) order.erase(order.begin() + kSlotFinalists, order.end());
        std::sort(order.begin(), order.end());  // ties after the fill go to the earlier candidate
        std::vector<double> filled;
        for (size_t i : order) {
            fill_free_slots(pool[i].first, in.load, in.source_load, E, topo, options.pricing);
            filled.push_back(layer_price(pool[i].first, in, topo, options));
        }
        pick = order[cheapest(filled)];
    }
    lp = std::move(pool[pick].first);
    if (slot_exact && options.priced_moves != 0)
        refine_layer_priced(lp, in.load, in.source_load, E, topo, options.pricing, options.priced_moves);
}

void plan_eplb_grouping(LayerPlan& lp, const LayerInput& in, int E, const Topology& topo, const MethodSpec& spec,
                        const PlanOptions& options) {
    const int G = topo.num_gpus();
    const bool eplb_rep = spec.replication == "eplb";
    int P = G * ((E + G - 1) / G);
    if (eplb_rep) {
        if (spec.replication_slots > 0)
            P = spec.replication_slots;
        else
            P = topo.slots_per_gpu ? G * *topo.slots_per_gpu : G * ((E + G - 1) / G + 1);
    }
    GRACE_CHECK_ARG(P % G == 0, "eplb:", P, " physical slots do not split evenly over ", G, " GPUs");
    GRACE_CHECK_ARG(P >= E, "eplb:", P, " physical slots cannot hold the ", E, " experts");
    // A GPU holds each expert at most once: more slots per GPU than experts cannot be filled (and would size
    // EPLB's tables by an arbitrary number, e.g. eplb:2147483647).
    GRACE_CHECK_ARG(P / G <= E, "eplb:", P, " means ", P / G, " slots per GPU, more than the ", E, " experts");
    GRACE_CHECK_ARG(!topo.slots_per_gpu || P / G <= *topo.slots_per_gpu, "eplb:", P, " needs ", P / G,
                    " slots per GPU but the topology has ", *topo.slots_per_gpu);
    const bool hier = spec.grouping == "eplb-hierarchical";
    const EplbResult r = rebalance_experts(in.load, 1, E, P, eplb_num_groups(E, topo, hier), hier ? topo.nodes : 1, G);
    const int per_gpu = P / G;
    std::vector<int> phy2log = r.phy2log;
    repair_eplb_duplicates(phy2log, r.logcnt, in.load, G, per_gpu);
    for (int p = 0; p < P; ++p) {
        const int e = phy2log[p];
        if (e >= 0 && lp.primary_gpu[e] < 0) {  // an expert's first slot holds its primary
            lp.primary_gpu[e] = p / per_gpu;
            lp.gpu_experts[p / per_gpu].push_back(e);
        }
    }
    if (!eplb_rep) {
        replicate_by_spec(lp, in, topo, spec, options);
        fill_and_refine(lp, in, E, topo, spec, options);
        return;
    }
    ReplicationOptions none;
    none.method = ReplicationMethod::kNone;
    replicate_layer(lp, in.load, topo, none);  // records gamma and the loads before replication
    // EPLB's other replicas; a duplicate the repair could not swap away (-1) leaves a slot that the padding rule
    // refills (the most useful expert that GPU lacks).
    for (int p = 0; p < P; ++p) {
        const int e = phy2log[p], g = p / per_gpu;
        auto& ex = lp.gpu_experts[g];
        if (e >= 0 && std::find(ex.begin(), ex.end(), e) == ex.end()) ex.push_back(e);
    }
    for (auto& ex : lp.gpu_experts) std::sort(ex.begin(), ex.end());
    pad_to_equal_slots(lp, in.load, E, topo, per_gpu);
    std::vector<int> count(E, 0);
    for (const auto& ex : lp.gpu_experts)
        for (int e : ex) ++count[e];
    lp.hot_experts.clear();
    lp.num_replicas = 0;
    for (int e = 0; e < E; ++e) {
        if (count[e] > 1) lp.hot_experts.push_back(e);
        lp.num_replicas = std::max(lp.num_replicas, count[e] - 1);
    }
}

LayerPlan plan_layer(const LayerInput& in, int E, const Topology& topo, const MethodSpec& spec,
                     const PlanOptions& options) {
    const int G = topo.num_gpus();
    const int cap = topo.slots_per_gpu ? *topo.slots_per_gpu : 0;
    LayerPlan lp;
    lp.layer = in.layer;
    lp.policy = spec.routing;
    lp.wrr_period = options.wrr_period;
    lp.gpu_experts.assign(G, {});
    lp.primary_gpu.assign(E, -1);
    SpectralOptions so;
    so.seed = mix64(options.seed, static_cast<uint64_t>(in.layer), 0);

    if (spec.grouping == "eplb-hierarchical" || spec.grouping == "eplb-global") {
        plan_eplb_grouping(lp, in, E, topo, spec, options);
    } else if (spec.grouping == "priced") {
        plan_priced_layer(lp, in, E, topo, spec, options, so);
    } else {
        std::vector<int> gpu_of_expert(E, -1);
        if (spec.grouping == "hierarchical") {
            Grouping nodes = hg_node_split(in, E, topo, so, cap);
            if (topo.nodes > 1 && spec.node_ratio >= 0) {
                const int M = topo.gpus_per_node;
                auto [lo, hi] = controlled_bounds(E, topo.nodes, spec.node_ratio, cap > 0 ? M * cap : 0);
                nodes = controlled_grouping(in.affinity, E, nodes, std::max(lo, M), hi, options.refine);
            }
            const HgLevel2 h = hg_level2(in, E, topo, nodes, options.seed, cap);
            gpu_of_expert = hg_assign(h, E, topo, kLevel2Knee, cap, options.refine, lp);
        } else {
            Grouping g;
            if (spec.grouping == "vanilla") {
                g = vanilla_grouping(E, G);
            } else if (spec.grouping == "occult") {
                g = occult_grouping(in.affinity, E, G);
            } else if (spec.grouping == "c2r") {
                g = c2r_grouping(in.affinity, E, G);
            } else if (spec.grouping == "metis") {
                g = repaired_metis_grouping(in, E, G, cap, so.seed);
            } else if (spec.grouping == "spectral-full") {
                g = spectral_grouping(in.affinity, E, G, so, 1, cap);
            } else if (spec.grouping == "spectral-controlled") {
                const Grouping full = spectral_grouping(in.affinity, E, G, so, 1, cap);
                if (spec.controlled_ratio >= 0) {
                    const auto [lo, hi] = controlled_bounds(E, G, spec.controlled_ratio, cap);
                    g = controlled_grouping(in.affinity, E, full, lo, hi, options.refine);
                    lp.r_star = spec.controlled_ratio;
                } else {
                    // The knee search is required here: refuse a shape where every r gives the same bounds (e.g. as
                    // many GPUs as experts), since there is nothing to choose. A data-driven single point (the
                    // spectral grouping already uniform) is accepted.
                    const auto b0 = controlled_bounds(E, G, 0.0, cap);
                    const auto b1 = controlled_bounds(E, G, static_cast<double>(E), cap);
                    GRACE_CHECK_ARG(E > G && b0 != b1, "spectral-controlled: the knee search has a single point (", E,
                                    " experts on ", G, " GPUs", cap ? cat(" with ", cap, " slots") : std::string(),
                                    " allow only group sizes [", b0.first, ", ", b0.second,
                                    "]); give a ratio (spectral-controlled:R) or another grouping");
                    KneeResult knee = knee_grouping(in.affinity, E, full, cap, options.refine, true);
                    lp.knee_curves.push_back(std::move(knee.curve));
                    lp.r_star = knee.r_star;
                    g = std::move(knee.grouping);
                }
            } else {
                GRACE_ASSERT(false);
            }
            const std::vector<int> gpu_of_group =
                spec.grouping == "vanilla" ? [&] {
                    std::vector<int> v(G);
                    for (int i = 0; i < G; ++i) v[i] = i;
                    return v;
                }()
                                           : place_groups_on_nodes(in.affinity, E, g, topo);
            for (int e = 0; e < E; ++e) gpu_of_expert[e] = gpu_of_group[g.group_of[e]];
        }
        set_primaries(lp, gpu_of_expert, cap, spec.grouping);
        replicate_by_spec(lp, in, topo, spec, options);
        fill_and_refine(lp, in, E, topo, spec, options);
    }
    build_routing_tables(lp, in.load, E, G);
    return lp;
}

}  // namespace

std::string MethodSpec::to_string() const {
    std::string g = grouping;
    if (grouping == "spectral-controlled" && controlled_ratio >= 0) g += ":" + format_ratio(controlled_ratio);
    if (grouping == "hierarchical" && node_ratio >= 0) g += ":" + format_ratio(node_ratio);
    std::string r = replication;
    if (replication == "eplb" && replication_slots > 0) r += ":" + std::to_string(replication_slots);
    return g + "+" + r + "+" + grace::to_string(routing);
}

MethodSpec parse_method(const std::string& text) {
    std::string t = text;
    if (t == "grace") t = "priced+priced+tar";
    if (t == "grace-paper") t = "hierarchical+dynamic+tar";
    if (t == "eplb") t = "eplb-hierarchical+eplb+sglang-static";
    std::vector<std::string> parts;
    size_t start = 0;
    for (;;) {
        const size_t p = t.find('+', start);
        parts.push_back(t.substr(start, p == std::string::npos ? std::string::npos : p - start));
        if (p == std::string::npos) break;
        start = p + 1;
    }
    GRACE_CHECK_ARG(parts.size() <= 3, "method '", text, "' has ", parts.size(),
                    " components; expected GROUPING[+REPLICATION[+ROUTING]] or 'grace' or 'eplb'");
    MethodSpec spec;
    {
        auto [name, param] = split_param(parts[0]);
        bool known = std::find_if(std::begin(kGroupings), std::end(kGroupings),
                                  [&](const char* k) { return name == k; }) != std::end(kGroupings);
        GRACE_CHECK_ARG(known, "unknown grouping '", parts[0], "' in method '", text,
                        "' (valid: ", join_names(kGroupings, std::size(kGroupings)), ")");
        spec.grouping = name;
        if (!param.empty() || parts[0].find(':') != std::string::npos) {
            GRACE_CHECK_ARG(name == "spectral-controlled" || name == "hierarchical", "grouping '", name,
                            "' takes no parameter (got '", parts[0], "')");
            char* end = nullptr;
            const double r = std::strtod(param.c_str(), &end);
            GRACE_CHECK_ARG(!param.empty() && end && *end == '\0' && std::isfinite(r) && r >= 0, name, " ratio '",
                            param, "' is not a number >= 0");
            (name == "hierarchical" ? spec.node_ratio : spec.controlled_ratio) = r;
        }
    }
    if (parts.size() >= 2) {
        auto [name, param] = split_param(parts[1]);
        bool known = std::find_if(std::begin(kReplications), std::end(kReplications),
                                  [&](const char* k) { return name == k; }) != std::end(kReplications);
        GRACE_CHECK_ARG(known, "unknown replication '", parts[1], "' in method '", text,
                        "' (valid: ", join_names(kReplications, std::size(kReplications)), ")");
        spec.replication = name;
        if (parts[1].find(':') != std::string::npos) {
            GRACE_CHECK_ARG(name == "eplb", "replication '", name, "' takes no parameter (got '", parts[1], "')");
            char* end = nullptr;
            const long v = std::strtol(param.c_str(), &end, 10);
            GRACE_CHECK_ARG(!param.empty() && end && *end == '\0' && v >= 1 && v <= INT_MAX, "eplb slot count '", param,
                            "' is not a positive integer");
            spec.replication_slots = static_cast<int>(v);
        }
    }
    if (parts.size() >= 3) {
        try {
            spec.routing = parse_routing_policy(parts[2]);
        } catch (const Error&) {
            GRACE_CHECK_ARG(false, "unknown routing '", parts[2], "' in method '", text,
                            "' (valid: primary, wrr, tar, vllm, sglang-static, sglang-dynamic, "
                            "sglang-nearest, vllm-ascend, trtllm)");
        }
    }
    return spec;
}

bool uses_pricing(const PlanOptions& options, const Topology& topology) {
    return uses_pricing(parse_method(options.method), topology, options);
}

ExpertPlan make_plan(const RoutingStats& stats, const Topology& topology, const PlanOptions& options) {
    topology.validate();
    const MethodSpec spec = parse_method(options.method);
    stats.validate();
    const int E = stats.num_experts, L = stats.num_layers, G = topology.num_gpus();
    GRACE_CHECK_ARG(G <= E, "topology ", topology.to_string(), " has ", G, " GPUs but the statistics have only ", E,
                    " experts (every GPU needs at least one)");
    if (topology.slots_per_gpu) {
        // A GPU holds each expert at most once, so more than E slots mean nothing; the bound also keeps the
        // G x S physical slots of EPLB-style maps inside int.
        const int64_t S = *topology.slots_per_gpu;
        GRACE_CHECK_ARG(S <= E, "slots per GPU (--slots-per-gpu) ", S, " exceeds the ", E,
                        " experts: a GPU holds each expert at most once");
        GRACE_CHECK_ARG(G * S >= E, "topology ", topology.to_string(), " has ", G, " x ", S, " = ", G * S,
                        " slots, too few for the ", E, " experts (--slots-per-gpu must be at least ", (E + G - 1) / G,
                        ")");
        GRACE_CHECK_ARG(G * S <= std::numeric_limits<int>::max(), "topology ", topology.to_string(), " has ", G * S,
                        " slots, more than int holds");
    }
    GRACE_CHECK_ARG(options.wrr_period >= 1 && options.wrr_period <= 65535, "WRR period ", options.wrr_period,
                    " is outside [1, 65535]");
    GRACE_CHECK_ARG(options.num_threads >= 0, "num_threads must be >= 0, got ", options.num_threads);

    ExpertPlan plan;
    plan.num_experts = E;
    plan.num_layers = L;
    if (stats.top_k > 0) {
        plan.top_k = stats.top_k;
    } else {
        // Imported loads without k: estimate it from the first layer (sum of loads = T * k).
        int64_t sum = 0;
        for (int e = 0; e < E; ++e) sum += stats.load_at(0, e);
        plan.top_k =
            stats.num_tokens > 0 ? static_cast<int>(std::llround(static_cast<double>(sum) / stats.num_tokens)) : 1;
        plan.top_k = std::clamp(plan.top_k, 1, E);
    }
    plan.topology = topology;
    plan.method = spec.to_string();
    plan.seed = options.seed;
    plan.source = "stats model=" + stats.model + " dataset=" + stats.dataset;
    plan.layers.resize(L);

    // 0 = mean loads; anything else must be a quantile in (0, 1] (robust_loads says so, NaN included).
    const std::vector<double> robust =
        options.robust_quantile != 0 ? robust_loads(stats, options.robust_quantile) : std::vector<double>();
    const bool needs_affinity =
        spec.grouping != "vanilla" && spec.grouping != "eplb-hierarchical" && spec.grouping != "eplb-global";
    std::vector<std::exception_ptr> errors(L);
    const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int l = 0; l < L; ++l) {
        try {
            LayerInput in;
            in.layer = l;
            if (needs_affinity) {
                in.affinity.resize(static_cast<size_t>(E) * E);
                const int64_t* a = stats.layer_affinity(l);
                for (size_t i = 0; i < in.affinity.size(); ++i) in.affinity[i] = static_cast<double>(a[i]);
            }
            in.load.resize(E);
            const int64_t* ld = stats.layer_load(l);
            for (int e = 0; e < E; ++e) in.load[e] = static_cast<double>(ld[e]);
            if (uses_pricing(spec, topology, options) && stats.num_gpus == G && !stats.source_load.empty()) {
                const int64_t* sl = stats.source_load.data() + static_cast<size_t>(l) * G * E;
                in.source_load.assign(sl, sl + static_cast<size_t>(G) * E);
            }
            if (!robust.empty()) {  // robust loads; source loads keep their split over GPUs, at the new totals
                for (int e = 0; e < E; ++e) {
                    const double r = robust[static_cast<size_t>(l) * E + e];
                    for (int g = 0; g < static_cast<int>(in.source_load.size()) / E; ++g)
                        in.source_load[static_cast<size_t>(g) * E + e] *= in.load[e] > 0 ? r / in.load[e] : 0.0;
                    in.load[e] = r;
                }
            }
            plan.layers[l] = plan_layer(in, E, topology, spec, options);
        } catch (...) {
            errors[l] = std::current_exception();
        }
    }
    for (int l = 0; l < L; ++l)
        if (errors[l]) std::rethrow_exception(errors[l]);
    plan.validate();
    return plan;
}

}  // namespace grace
