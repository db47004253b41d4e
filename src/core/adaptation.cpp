#include "grace/adaptation.hpp"

#include <cmath>

#include "grace/error.hpp"
#include "grace/replication.hpp"

namespace grace {

void AdaptationOptions::validate() const {
    GRACE_CHECK_ARG(interval >= 0, "--adapt must be >= 0 batches, got ", interval);
    GRACE_CHECK_ARG(batch_tokens >= 1, "--adapt-batch-tokens must be >= 1, got ", batch_tokens);
    GRACE_CHECK_ARG(std::isfinite(decay) && decay >= 0 && decay < 1, "--adapt-decay must be in [0, 1), got ", decay);
}

std::vector<int> instance_offsets(const LayerPlan& layer) {
    std::vector<int> off(layer.instance_gpus.size() + 1, 0);
    for (size_t e = 0; e < layer.instance_gpus.size(); ++e)
        off[e + 1] = off[e] + static_cast<int>(layer.instance_gpus[e].size());
    return off;
}

std::vector<std::vector<int>> repredict_wrr_weights(const LayerPlan& layer, const std::vector<double>& expert_load,
                                                    int num_gpus) {
    const int E = static_cast<int>(layer.instance_gpus.size());
    GRACE_CHECK_ARG(static_cast<int>(expert_load.size()) == E, "re-prediction needs ", E, " expert loads, got ",
                    expert_load.size());
    for (int e = 0; e < E; ++e)
        GRACE_CHECK_ARG(std::isfinite(expert_load[e]) && expert_load[e] >= 0, "expert ", e, " has load ",
                        expert_load[e], "; loads must be finite and non-negative");
    // The planner's finalize step on a copy: same rule, same rounding, new loads.
    LayerPlan copy = layer;
    build_routing_tables(copy, expert_load, E, num_gpus);
    return copy.wrr_weights;
}

void count_instance_selections(const LayerPlan& layer, const int32_t* topk_ids, const int32_t* dest_gpus,
                               int64_t num_tokens, int top_k, std::vector<int64_t>& counts) {
    const int E = static_cast<int>(layer.instance_gpus.size());
    const std::vector<int> off = instance_offsets(layer);
    GRACE_CHECK_ARG(counts.size() == static_cast<size_t>(off[E]), "instance counts hold ", counts.size(),
                    " entries, the layer has ", off[E], " instances");
    for (int64_t i = 0; i < num_tokens * top_k; ++i) {
        const int e = topk_ids[i];
        if (e == -1) continue;
        GRACE_CHECK_ARG(e >= 0 && e < E, "expert id ", e, " is out of range [0, ", E, ")");
        const auto& gpus = layer.instance_gpus[e];
        int inst = -1;
        for (size_t j = 0; j < gpus.size(); ++j)
            if (gpus[j] == dest_gpus[i]) inst = static_cast<int>(j);
        GRACE_CHECK_ARG(inst >= 0, "a selection of expert ", e, " went to GPU ", dest_gpus[i],
                        ", which holds no instance of it");
        ++counts[off[e] + inst];
    }
}

namespace {
uint64_t fnv1a(uint64_t h, uint64_t v) {
    for (int b = 0; b < 8; ++b) {
        h ^= (v >> (8 * b)) & 0xff;
        h *= 1099511628211ull;
    }
    return h;
}
}  // namespace

WrrAdapter::WrrAdapter(const LayerPlan& layer, int num_gpus, const AdaptationOptions& options)
    : layer_(layer), num_gpus_(num_gpus), interval_(options.interval), decay_(options.decay) {
    options.validate();
    const int E = static_cast<int>(layer.instance_gpus.size());
    GRACE_CHECK_ARG(E > 0 && layer.wrr_weights.size() == layer.instance_gpus.size(),
                    "adaptation needs a finalized layer plan (instance_gpus and wrr_weights for every expert)");
    offsets_ = instance_offsets(layer_);
    history_.assign(E, 0.0);
    weights_ = layer_.wrr_weights;
}

const std::vector<std::vector<int>>& WrrAdapter::update(const std::vector<int64_t>& interval_counts) {
    const int E = static_cast<int>(history_.size());
    GRACE_CHECK_ARG(interval_counts.size() == static_cast<size_t>(offsets_[E]), "adaptation got ",
                    interval_counts.size(), " instance counts, the layer has ", offsets_[E], " instances");
    double total = 0;
    for (int e = 0; e < E; ++e) {
        int64_t sum = 0;
        for (int i = offsets_[e]; i < offsets_[e + 1]; ++i) {
            GRACE_CHECK_ARG(interval_counts[i] >= 0, "instance count ", interval_counts[i], " is negative");
            sum += interval_counts[i];
        }
        history_[e] = decay_ * history_[e] + static_cast<double>(sum);
        total += history_[e];
    }
    if (total > 0) {
        layer_.wrr_weights = weights_;
        weights_ = repredict_wrr_weights(layer_, history_, num_gpus_);
    }
    ++updates_;
    for (const auto& w : weights_)
        for (int x : w) hash_ = fnv1a(hash_, static_cast<uint64_t>(x));
    return weights_;
}

uint64_t combine_tables_hashes(const std::vector<uint64_t>& layer_hashes) {
    uint64_t h = 14695981039346656037ull;
    for (uint64_t v : layer_hashes) h = fnv1a(h, v);
    return h;
}

}  // namespace grace
