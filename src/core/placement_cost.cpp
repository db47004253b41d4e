#include "grace/placement_cost.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "grace/error.hpp"

namespace grace {

void PlacementPricing::validate() const {
    GRACE_CHECK_ARG(std::isfinite(bytes_per_token) && bytes_per_token > 0, "pricing: bytes per token must be > 0, got ",
                    bytes_per_token);
    GRACE_CHECK_ARG(std::isfinite(net_bandwidth) && net_bandwidth > 0, "pricing: cross-node bandwidth must be > 0, got ",
                    net_bandwidth);
    GRACE_CHECK_ARG(std::isfinite(nvl_bandwidth) && nvl_bandwidth > 0, "pricing: intra-node bandwidth must be > 0, got ",
                    nvl_bandwidth);
}

namespace {

// hardware.hpp's analytic default f(n) = 6*H*I*(n + n_half)/peak at H = 2048, I = 1024, 200 TFLOP/s, n_half = 100.
double default_expert_seconds(double n) { return n > 0 ? 6.0 * 2048 * 1024 * (n + 100.0) / 200e12 : 0.0; }

}  // namespace

LayerCostModel::LayerCostModel(const std::vector<double>& load, const std::vector<double>& source_load,
                               const std::vector<std::vector<int>>& instance_gpus, const Topology& topology,
                               const PlacementPricing& pricing)
    : num_experts_(static_cast<int>(load.size())),
      num_gpus_(topology.num_gpus()),
      topology_(topology),
      pricing_(pricing),
      load_(load),
      inst_(instance_gpus) {
    pricing_.validate();
    if (!pricing_.expert_seconds) pricing_.expert_seconds = default_expert_seconds;
    const int E = num_experts_, G = num_gpus_;
    GRACE_CHECK_ARG(static_cast<int>(inst_.size()) == E, "cost model: ", inst_.size(), " instance lists for ", E,
                    " experts");
    GRACE_CHECK_ARG(source_load.empty() || source_load.size() == static_cast<size_t>(G) * E,
                    "cost model: source loads hold ", source_load.size(), " values, expected G*E = ",
                    static_cast<size_t>(G) * E);
    source_.resize(static_cast<size_t>(G) * E);
    for (int g = 0; g < G; ++g)
        for (int e = 0; e < E; ++e)
            source_[static_cast<size_t>(g) * E + e] =
                source_load.empty() ? load[e] / G : source_load[static_cast<size_t>(g) * E + e];
    for (int e = 0; e < E; ++e) {
        GRACE_CHECK_ARG(!inst_[e].empty(), "cost model: expert ", e, " has no instance");
        for (int g : inst_[e]) GRACE_CHECK_ARG(g >= 0 && g < G, "cost model: GPU ", g, " outside [0, ", G, ")");
    }
    node_of_.resize(G);
    for (int g = 0; g < G; ++g) node_of_[g] = topology.node_of(g);
    totals_.assign(3 * static_cast<size_t>(G) + 2 * static_cast<size_t>(topology.nodes), 0.0);
    for (int e = 0; e < E; ++e) apply(totals_, e, inst_[e], +1.0);
    scratch_.assign(totals_.size(), 0.0);
}

template <class Fn>
void LayerCostModel::delta_into(std::vector<std::pair<size_t, double>>& d, Fn fn) const {
    fn();
    d.clear();
    // A scan of the few totals (3G + 2N) costs less than journaling each of apply's additions.
    for (size_t i = 0; i < scratch_.size(); ++i) {
        if (scratch_[i] != 0) d.emplace_back(i, scratch_[i]);
        scratch_[i] = 0;
    }
}

const std::vector<std::pair<size_t, double>>& LayerCostModel::add_delta(int expert, int gpu) const {
    const size_t at = static_cast<size_t>(expert) * num_gpus_ + gpu;
    if (add_delta_known_.empty()) {
        add_delta_.assign(static_cast<size_t>(num_experts_) * num_gpus_, {});
        add_delta_known_.assign(static_cast<size_t>(num_experts_) * num_gpus_, 0);
    }
    if (add_delta_known_[at]) return add_delta_[at];
    // The expert's current contribution taken out is remove_delta (the same for every gpu, so computed once):
    // its values are what apply(-1) leaves in the scratch, entry for entry, so loading them and then applying the
    // new contribution gives the same sums as the two applies.
    const auto& removed = remove_delta(expert);
    auto& d = add_delta_[at];
    delta_into(d, [&] {
        for (const auto& [i, v] : removed) scratch_[i] = v;
        gpus_ = inst_[expert];
        gpus_.push_back(gpu);
        apply(scratch_, expert, gpus_, +1.0);
    });
    add_delta_known_[at] = 1;
    return d;
}

const std::vector<std::pair<size_t, double>>& LayerCostModel::remove_delta(int expert) const {
    if (remove_delta_known_.empty()) {
        remove_delta_.assign(num_experts_, {});
        remove_delta_known_.assign(num_experts_, 0);
    }
    auto& d = remove_delta_[expert];
    if (remove_delta_known_[expert]) return d;
    delta_into(d, [&] { apply(scratch_, expert, inst_[expert], -1.0); });
    remove_delta_known_[expert] = 1;
    return d;
}

void LayerCostModel::forget_deltas(int expert) {
    if (!add_delta_known_.empty())
        std::fill_n(add_delta_known_.begin() + static_cast<ptrdiff_t>(expert) * num_gpus_, num_gpus_, 0);
    if (!remove_delta_known_.empty()) remove_delta_known_[expert] = 0;
}

void LayerCostModel::apply(Totals& t, int e, const std::vector<int>& gpus, double sign) const {
    const int E = num_experts_, G = num_gpus_;
    const int n = static_cast<int>(gpus.size());
    // Tokens each instance receives, and the copies they cause, under TAR with an even split inside a tier.
    double received[256];  // an expert has at most 255 instances (plan.hpp)
    int inst_node[256];
    GRACE_ASSERT(n <= 255);
    std::fill(received, received + n, 0.0);
    if (slot_on_gpu_.size() != static_cast<size_t>(G)) slot_on_gpu_.assign(G, -1);
    if (on_node_.size() != static_cast<size_t>(topology_.nodes)) on_node_.assign(topology_.nodes, 0);
    for (int j = 0; j < n; ++j) {
        inst_node[j] = node_of_[gpus[j]];
        ++on_node_[inst_node[j]];
        slot_on_gpu_[gpus[j]] = j;
    }
    for (int s = 0; s < G; ++s) {
        const double tokens = source_[static_cast<size_t>(s) * E + e];
        if (tokens == 0) continue;
        const int node = node_of_[s];
        const int local = slot_on_gpu_[s], same_node = on_node_[node];
        if (local >= 0) {
            received[local] += tokens;  // served at home: no copy
            continue;
        }
        const bool node_tier = same_node > 0;
        const double share = tokens / (node_tier ? same_node : n);
        double out_intra = 0, out_cross = 0;
        for (int j = 0; j < n; ++j) {
            const int dn = inst_node[j];
            if (node_tier && dn != node) continue;
            received[j] += share;
            if (dn == node) {
                out_intra += share;
                t[intra_in_at(gpus[j])] += sign * share;
            } else {
                out_cross += share;
                t[cross_in_at(dn)] += sign * share;
            }
        }
        if (out_intra != 0) t[intra_out_at(s)] += sign * out_intra;
        if (out_cross != 0) t[cross_out_at(node)] += sign * out_cross;
    }
    for (int j = 0; j < n; ++j) {
        t[compute_at(gpus[j])] += sign * pricing_.expert_seconds(received[j]);
        --on_node_[inst_node[j]];
        slot_on_gpu_[gpus[j]] = -1;
    }
}

double LayerCostModel::price(const Totals& t) const {
    const int G = num_gpus_, N = topology_.nodes;
    double cross = 0, intra = 0, compute = 0;
    for (int i = 0; i < N; ++i) cross = std::max({cross, t[cross_out_at(i)], t[cross_in_at(i)]});
    for (int g = 0; g < G; ++g) {
        intra = std::max({intra, t[intra_out_at(g)], t[intra_in_at(g)]});
        compute = std::max(compute, t[compute_at(g)]);
    }
    return 2.0 * pricing_.bytes_per_token * (cross / pricing_.net_bandwidth + intra / pricing_.nvl_bandwidth) +
           compute;
}

LayerCostModel::Bottlenecks LayerCostModel::bottlenecks() const {
    const int G = num_gpus_, N = topology_.nodes;
    Bottlenecks b;
    for (int i = 0; i < N; ++i)
        b.cross_copies = std::max({b.cross_copies, totals_[cross_out_at(i)], totals_[cross_in_at(i)]});
    for (int g = 0; g < G; ++g) {
        b.intra_copies = std::max({b.intra_copies, totals_[intra_out_at(g)], totals_[intra_in_at(g)]});
        b.compute_seconds = std::max(b.compute_seconds, totals_[compute_at(g)]);
    }
    return b;
}

void LayerCostModel::rank_base() const {
    const uint32_t G = static_cast<uint32_t>(num_gpus_), N = static_cast<uint32_t>(topology_.nodes);
    const uint32_t begin[4] = {0, G, 3 * G, 3 * G + 2 * N};  // [compute G | intra 2G | cross 2N]
    // Only the largest few of each term are ranked: a candidate touches few entries, so the scan in price_with
    // nearly always stops inside them; the rest of the term, unordered, is scanned in full otherwise.
    constexpr uint32_t kRanked = 8;
    for (int term = 0; term < 3; ++term) {
        auto& r = ranked_[term];
        const uint32_t n = begin[term + 1] - begin[term];
        r.resize(n);
        for (uint32_t i = 0; i < n; ++i) r[i] = begin[term] + i;
        const uint32_t top = std::min<uint32_t>(kRanked, n);
        // r[0, top) kept in descending order by insertion; a later entry larger than r[top - 1] swaps in and moves
        // up. r stays a permutation (the rest, unordered, is what price_with scans when every ranked one is taken).
        const double* v = base_.data();
        for (uint32_t i = 1; i < n; ++i) {
            uint32_t j = i < top ? i : top - 1;
            if (i >= top) {
                if (!(v[r[i]] > v[r[j]])) continue;
                std::swap(r[i], r[j]);
            }
            for (; j > 0 && v[r[j]] > v[r[j - 1]]; --j) std::swap(r[j], r[j - 1]);
        }
        ranked_top_[term] = top;
    }
    if (mark_.size() != base_.size()) {
        mark_.assign(base_.size(), 0);
        stamp_ = 0;
    }
}

double LayerCostModel::price_with(const std::vector<std::pair<size_t, double>>& d) const {
    const size_t G = static_cast<size_t>(num_gpus_);
    if (++stamp_ == 0) {  // wrapped: clear the marks once every 2^32 calls
        std::fill(mark_.begin(), mark_.end(), 0);
        stamp_ = 1;
    }
    double top[3] = {0, 0, 0};  // compute, intra, cross; price() starts its maxima at 0 as well
    for (const auto& [i, v] : d) {
        mark_[i] = stamp_;
        const int term = i < G ? 0 : i < 3 * G ? 1 : 2;
        top[term] = std::max(top[term], base_[i] + v);
    }
    for (int term = 0; term < 3; ++term) {
        const auto& r = ranked_[term];
        size_t q = 0;
        while (q < ranked_top_[term] && mark_[r[q]] == stamp_) ++q;
        if (q < ranked_top_[term]) {
            top[term] = std::max(top[term], base_[r[q]]);
        } else {  // every ranked entry touched: the untouched maximum is among the rest
            for (; q < r.size(); ++q)
                if (mark_[r[q]] != stamp_) top[term] = std::max(top[term], base_[r[q]]);
        }
    }
    return 2.0 * pricing_.bytes_per_token * (top[2] / pricing_.net_bandwidth + top[1] / pricing_.nvl_bandwidth) +
           top[0];
}

double LayerCostModel::mean_price(const Totals& t) const {
    const int G = num_gpus_, N = topology_.nodes;
    double cross = 0, intra = 0, compute = 0;
    for (int i = 0; i < N; ++i) cross += std::max(t[cross_out_at(i)], t[cross_in_at(i)]);
    for (int g = 0; g < G; ++g) {
        intra += std::max(t[intra_out_at(g)], t[intra_in_at(g)]);
        compute += t[compute_at(g)];
    }
    return 2.0 * pricing_.bytes_per_token * (cross / N / pricing_.net_bandwidth + intra / G / pricing_.nvl_bandwidth) +
           compute / G;
}

double LayerCostModel::time() const { return price(totals_); }

double LayerCostModel::time_with(int expert, int gpu) const {
    std::vector<char> allowed(num_gpus_, 0);
    GRACE_ASSERT(gpu >= 0 && gpu < num_gpus_);
    allowed[gpu] = 1;
    std::vector<double> t, m;
    times_with(expert, allowed, t, m);
    GRACE_ASSERT(std::isfinite(t[gpu]));  // the GPU must not hold the expert yet
    return t[gpu];
}

void LayerCostModel::times_with(int expert, const std::vector<char>& allowed, std::vector<double>& out,
                                std::vector<double>& mean_out) const {
    GRACE_ASSERT(expert >= 0 && expert < num_experts_ && static_cast<int>(allowed.size()) == num_gpus_);
    const auto& cur = inst_[expert];
    out.assign(num_gpus_, std::numeric_limits<double>::infinity());
    mean_out.assign(num_gpus_, std::numeric_limits<double>::infinity());
    base_ = totals_;
    rank_base();
    std::vector<double> saved;
    for (int g = 0; g < num_gpus_; ++g) {
        if (!allowed[g] || std::find(cur.begin(), cur.end(), g) != cur.end()) continue;
        // The expert's contribution does not depend on the others', so its cached delta applies to the totals.
        const auto& d = add_delta(expert, g);
        out[g] = price_with(d);
        saved.resize(d.size());
        for (size_t i = 0; i < d.size(); ++i) {
            saved[i] = base_[d[i].first];
            base_[d[i].first] += d[i].second;
        }
        mean_out[g] = mean_price(base_);
        for (size_t i = 0; i < d.size(); ++i) base_[d[i].first] = saved[i];  // undo
    }
}

double LayerCostModel::time_without(int expert) const {
    GRACE_ASSERT(expert >= 0 && expert < num_experts_);
    const auto& d = remove_delta(expert);
    base_ = totals_;
    for (const auto& [i, v] : d) base_[i] += v;
    return price(base_);
}

void LayerCostModel::times_without(std::vector<double>& out) const {
    base_ = totals_;
    rank_base();
    out.resize(num_experts_);
    for (int e = 0; e < num_experts_; ++e) out[e] = price_with(remove_delta(e));
}

void LayerCostModel::add(int expert, int gpu) {
    GRACE_ASSERT(expert >= 0 && expert < num_experts_ && gpu >= 0 && gpu < num_gpus_);
    apply(totals_, expert, inst_[expert], -1.0);
    inst_[expert].push_back(gpu);
    apply(totals_, expert, inst_[expert], +1.0);
    forget_deltas(expert);
}

void LayerCostModel::swap_times(int gpu, int removed, const std::vector<char>& can_add,
                                std::vector<double>& out) const {
    GRACE_ASSERT(gpu >= 0 && gpu < num_gpus_ && removed >= 0 && removed < num_experts_ &&
                 static_cast<int>(can_add.size()) == num_experts_);
    const auto& rx = inst_[removed];
    GRACE_ASSERT(rx.size() >= 2 && std::find(rx.begin(), rx.end(), gpu) != rx.end());
    out.assign(num_experts_, std::numeric_limits<double>::infinity());
    base_ = totals_;
    apply(base_, removed, rx, -1.0);
    gpus_.clear();
    for (int g : rx)
        if (g != gpu) gpus_.push_back(g);
    apply(base_, removed, gpus_, +1.0);
    rank_base();
    for (int y = 0; y < num_experts_; ++y) {
        const auto& iy = inst_[y];
        if (!can_add[y] || y == removed || std::find(iy.begin(), iy.end(), gpu) != iy.end()) continue;
        // y's contribution does not depend on the other experts', so its cached delta applies to any base.
        out[y] = price_with(add_delta(y, gpu));
    }
}

void LayerCostModel::swap(int gpu, int removed, int added) {
    auto& rx = inst_[removed];
    auto it = std::find(rx.begin(), rx.end(), gpu);
    GRACE_ASSERT(rx.size() >= 2 && it != rx.end());
    GRACE_ASSERT(std::find(inst_[added].begin(), inst_[added].end(), gpu) == inst_[added].end());
    apply(totals_, removed, rx, -1.0);
    rx.erase(it);
    apply(totals_, removed, rx, +1.0);
    forget_deltas(removed);
    add(added, gpu);
}

}  // namespace grace
