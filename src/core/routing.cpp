#include "grace/routing.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "grace/error.hpp"

namespace grace {

std::vector<uint8_t> smooth_wrr_sequence(const std::vector<int>& weights) {
    GRACE_CHECK_ARG(!weights.empty() && weights.size() <= 255, "WRR needs 1 to 255 instances, got ", weights.size());
    int total = 0;
    for (int w : weights) {
        GRACE_CHECK_ARG(w >= 1, "WRR weight ", w, " must be at least 1");
        total += w;
    }
    std::vector<int> current(weights.size(), 0);
    std::vector<uint8_t> seq(static_cast<size_t>(total));
    for (int step = 0; step < total; ++step) {
        size_t best = 0;
        for (size_t i = 0; i < weights.size(); ++i) {
            current[i] += weights[i];
            if (current[i] > current[best]) best = i;
        }
        current[best] -= total;
        seq[step] = static_cast<uint8_t>(best);
    }
    return seq;
}

std::vector<int> round_weights(const std::vector<double>& weights, int period) {
    const int n = static_cast<int>(weights.size());
    GRACE_CHECK_ARG(n >= 1, "cannot round an empty weight list");
    GRACE_CHECK_ARG(period >= n, "WRR period ", period, " is smaller than the instance count ", n);
    double sum = 0;
    for (double w : weights) {
        GRACE_CHECK_ARG(std::isfinite(w) && w > 0, "WRR weight ", w, " must be positive and finite");
        sum += w;
    }
    std::vector<double> exact(n);
    std::vector<int> out(n);
    int assigned = 0;
    for (int i = 0; i < n; ++i) {
        exact[i] = weights[i] / sum * period;
        out[i] = std::max(1, static_cast<int>(std::floor(exact[i])));
        assigned += out[i];
    }
    // Largest remainder: hand out what is left to the largest fractional parts (ties: lower index); if the
    // minimum of one overshot, take back from the most over-allocated instances.
    while (assigned < period) {
        int best = 0;
        double best_gap = -1e300;
        for (int i = 0; i < n; ++i) {
            double gap = exact[i] - out[i];
            if (gap > best_gap) best_gap = gap, best = i;
        }
        ++out[best];
        ++assigned;
    }
    while (assigned > period) {
        int best = -1;
        double best_gap = -1e300;
        for (int i = 0; i < n; ++i) {
            if (out[i] <= 1) continue;
            double gap = out[i] - exact[i];
            if (gap > best_gap) best_gap = gap, best = i;
        }
        GRACE_ASSERT(best >= 0);
        --out[best];
        --assigned;
    }
    return out;
}

ReplicaRouter::ReplicaRouter(const LayerPlan& layer, const Topology& topology, RoutingPolicy policy, uint64_t seed)
    : layer_(&layer),
      topology_(topology),
      policy_(policy),
      seed_(seed),
      num_experts_(static_cast<int>(layer.instance_gpus.size())),
      period_(layer.wrr_period) {
    GRACE_CHECK_ARG(num_experts_ > 0 && layer.wrr_weights.size() == layer.instance_gpus.size(),
                    "routing needs a finalized layer plan (instance_gpus and wrr_weights for every expert)");
    const int G = topology.num_gpus();
    const size_t pairs = static_cast<size_t>(G) * num_experts_;
    offsets_.assign(pairs, 0);
    seq_begin_.assign(pairs, 0);
    origins_.assign(G, 0);
    if (policy == RoutingPolicy::kWrr || policy == RoutingPolicy::kTar) {
        build_sequences(layer.wrr_weights);
    } else if (is_engine_policy(policy)) {
        std::vector<SlotMap> one{slot_map_of(layer)};
        attach_engine(std::move(make_engine_routers(one, num_experts_, topology, policy, seed).front()));
    }
}

void ReplicaRouter::build_sequences(const std::vector<std::vector<int>>& weights) {
    GRACE_CHECK_ARG(static_cast<int>(weights.size()) == num_experts_, "WRR weights for ", weights.size(),
                    " experts, the layer has ", num_experts_);
    for (int e = 0; e < num_experts_; ++e)
        GRACE_CHECK_ARG(weights[e].size() == layer_->instance_gpus[e].size(), "expert ", e, " has ",
                        layer_->instance_gpus[e].size(), " instances but ", weights[e].size(), " WRR weights");
    const int G = topology_.num_gpus();
    const size_t pairs = static_cast<size_t>(G) * num_experts_;
    sequences_.clear();
    if (policy_ == RoutingPolicy::kWrr) {
        // Every source shares the expert's sequence over all instances.
        std::vector<int64_t> expert_begin(num_experts_);
        for (int e = 0; e < num_experts_; ++e) {
            expert_begin[e] = static_cast<int64_t>(sequences_.size());
            auto seq = smooth_wrr_sequence(weights[e]);
            GRACE_CHECK_INPUT(static_cast<int>(seq.size()) == period_, "layer ", layer_->layer,
                              ": WRR weights of expert ", e, " sum to ", seq.size(), ", not the period ", period_);
            sequences_.insert(sequences_.end(), seq.begin(), seq.end());
        }
        for (int s = 0; s < G; ++s)
            for (int e = 0; e < num_experts_; ++e)
                seq_begin_[static_cast<size_t>(s) * num_experts_ + e] = expert_begin[e];
    } else {
        // The tier depends only on (source, expert): build each tier's sequence over its instances, with the
        // instance weights renormalized to the period.
        sequences_.reserve(pairs * period_);
        for (int s = 0; s < G; ++s) {
            const int node = topology_.node_of(s);
            for (int e = 0; e < num_experts_; ++e) {
                const auto& gpus = layer_->instance_gpus[e];
                std::vector<int> tier;
                for (size_t i = 0; i < gpus.size(); ++i)
                    if (gpus[i] == s) tier.push_back(static_cast<int>(i));
                if (tier.empty())
                    for (size_t i = 0; i < gpus.size(); ++i)
                        if (topology_.node_of(gpus[i]) == node) tier.push_back(static_cast<int>(i));
                if (tier.empty()) {
                    tier.resize(gpus.size());
                    std::iota(tier.begin(), tier.end(), 0);
                }
                seq_begin_[static_cast<size_t>(s) * num_experts_ + e] = static_cast<int64_t>(sequences_.size());
                if (tier.size() == 1) {
                    sequences_.insert(sequences_.end(), period_, static_cast<uint8_t>(tier[0]));
                    continue;
                }
                std::vector<double> w;
                for (int i : tier) w.push_back(weights[e][i]);
                auto seq = smooth_wrr_sequence(round_weights(w, period_));
                for (uint8_t pick : seq) sequences_.push_back(static_cast<uint8_t>(tier[pick]));
            }
        }
    }
}

void ReplicaRouter::set_wrr_weights(const std::vector<std::vector<int>>& weights) {
    GRACE_CHECK_ARG(policy_ == RoutingPolicy::kWrr || policy_ == RoutingPolicy::kTar,
                    "WRR weights can be replaced only under the wrr and tar policies, not ", to_string(policy_));
    build_sequences(weights);
}

ReplicaRouter::ReplicaRouter(const LayerPlan& layer, const Topology& topology,
                             std::unique_ptr<EngineLayerRouter> engine)
    : layer_(&layer),
      topology_(topology),
      policy_(engine ? engine->policy() : RoutingPolicy::kPrimary),
      seed_(0),
      num_experts_(static_cast<int>(layer.instance_gpus.size())),
      period_(layer.wrr_period) {
    GRACE_CHECK_ARG(engine != nullptr, "ReplicaRouter needs an engine router");
    const size_t pairs = static_cast<size_t>(topology.num_gpus()) * num_experts_;
    offsets_.assign(pairs, 0);
    seq_begin_.assign(pairs, 0);
    origins_.assign(topology.num_gpus(), 0);
    attach_engine(std::move(engine));
}

ReplicaRouter::~ReplicaRouter() = default;
ReplicaRouter::ReplicaRouter(ReplicaRouter&&) noexcept = default;
ReplicaRouter& ReplicaRouter::operator=(ReplicaRouter&&) noexcept = default;

void ReplicaRouter::attach_engine(std::unique_ptr<EngineLayerRouter> engine) {
    const SlotMap& m = engine->slots();
    slot_instance_.assign(m.slot_expert.size(), -1);
    for (size_t p = 0; p < m.slot_expert.size(); ++p) {
        const int e = m.slot_expert[p];
        GRACE_CHECK_INPUT(e >= 0 && e < num_experts_, "layer ", layer_->layer, ": physical slot ", p, " holds expert ",
                          e, ", outside [0, ", num_experts_, ")");
        const auto& gpus = layer_->instance_gpus[e];
        auto it = std::find(gpus.begin(), gpus.end(), m.slot_gpu[p]);
        GRACE_CHECK_INPUT(it != gpus.end(), "layer ", layer_->layer, ": physical slot ", p, " puts expert ", e,
                          " on GPU ", m.slot_gpu[p], ", which holds no instance of it");
        slot_instance_[p] = static_cast<int>(it - gpus.begin());
    }
    engine_ = std::move(engine);
}

bool ReplicaRouter::fixed_per_source() const {
    return policy_ == RoutingPolicy::kPrimary || (engine_ && engine_->fixed_per_source());
}

int ReplicaRouter::route(int source, int expert, int64_t token, int j, int top_k) {
    const auto& gpus = layer_->instance_gpus[expert];
    const size_t key = static_cast<size_t>(source) * num_experts_ + expert;
    int pick = 0;
    switch (policy_) {
        case RoutingPolicy::kPrimary:
            pick = 0;
            break;
        case RoutingPolicy::kWrr:
        case RoutingPolicy::kTar: {
            int& offset = offsets_[key];
            pick = sequences_[seq_begin_[key] + offset];
            if (++offset == period_) offset = 0;
            break;
        }
        default:
            pick = slot_instance_[engine_->route(source, expert, token - origins_[source], j, top_k)];
            break;
    }
    last_instance_ = pick;
    return gpus[pick];
}

void ReplicaRouter::set_token_origin(int source, int64_t first_token) {
    GRACE_CHECK_ARG(source >= 0 && source < static_cast<int>(origins_.size()), "source GPU ", source,
                    " is outside [0, ", origins_.size(), ")");
    origins_[static_cast<size_t>(source)] = first_token;
}

void ReplicaRouter::reset() {
    std::fill(offsets_.begin(), offsets_.end(), 0);
    if (engine_) engine_->reset();
}

void ReplicaRouter::set_offsets(const std::vector<int>& offsets) {
    GRACE_CHECK_ARG(offsets.size() == offsets_.size(), "expected ", offsets_.size(), " WRR offsets, got ",
                    offsets.size());
    for (int o : offsets) GRACE_CHECK_ARG(o >= 0 && o < period_, "WRR offset ", o, " is outside [0, ", period_, ")");
    offsets_ = offsets;
}

std::vector<uint8_t> ReplicaRouter::flat_sequences() const {
    GRACE_CHECK_ARG(policy_ == RoutingPolicy::kWrr || policy_ == RoutingPolicy::kTar,
                    "pick sequences exist only for the wrr and tar policies");
    std::vector<uint8_t> out;
    out.reserve(seq_begin_.size() * period_);
    for (int64_t begin : seq_begin_)
        out.insert(out.end(), sequences_.begin() + begin, sequences_.begin() + begin + period_);
    return out;
}

std::vector<std::unique_ptr<ReplicaRouter>> make_layer_routers(const ExpertPlan& plan,
                                                               const std::optional<RoutingPolicy>& policy,
                                                               uint64_t seed, const std::vector<SlotMap>& slot_maps) {
    const int L = plan.num_layers;
    GRACE_CHECK_ARG(slot_maps.empty() || static_cast<int>(slot_maps.size()) >= L,
                    "routing needs a slot map per layer (", L, "), got ", slot_maps.size());
    std::vector<SlotMap> maps = slot_maps;
    if (maps.empty())
        for (const auto& lp : plan.layers) maps.push_back(slot_map_of(lp));
    const size_t lead = maps.size() - static_cast<size_t>(L);
    // Engine routers of each engine policy in use, built over all layers at once.
    std::vector<std::unique_ptr<EngineLayerRouter>> engine(maps.size());
    std::vector<RoutingPolicy> built;
    for (int l = 0; l < L; ++l) {
        const RoutingPolicy pol = policy.value_or(plan.layers[l].policy);
        if (!is_engine_policy(pol) || std::count(built.begin(), built.end(), pol)) continue;
        built.push_back(pol);
        auto routers = make_engine_routers(maps, plan.num_experts, plan.topology, pol, seed);
        for (int m = l; m < L; ++m)
            if (policy.value_or(plan.layers[m].policy) == pol) engine[lead + m] = std::move(routers[lead + m]);
    }
    std::vector<std::unique_ptr<ReplicaRouter>> out;
    for (int l = 0; l < L; ++l) {
        const LayerPlan& lp = plan.layers[l];
        if (engine[lead + l])
            out.push_back(std::make_unique<ReplicaRouter>(lp, plan.topology, std::move(engine[lead + l])));
        else
            out.push_back(std::make_unique<ReplicaRouter>(lp, plan.topology, policy.value_or(lp.policy), seed));
    }
    return out;
}

}  // namespace grace
