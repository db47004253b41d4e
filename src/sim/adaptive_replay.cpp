// The replay side of online adaptation (adaptation.hpp): every GPU's block of the trace is fed batch by batch, as
// the runtimes feed it, and every N batches each layer's WRR weights are re-predicted from the interval's counts.
#include <omp.h>

#include <exception>

#include "grace/adaptation.hpp"
#include "grace/error.hpp"
#include "grace/routing.hpp"

namespace grace {

AdaptiveReplay replay_adaptive(const RoutingTrace& trace, const ExpertPlan& plan, const ReplayOptions& replay,
                               const AdaptationOptions& options) {
    options.validate();
    check_plan_matches_trace(plan, trace);
    for (int l = 0; l < plan.num_layers; ++l) {
        const RoutingPolicy policy = replay.policy.value_or(plan.layers[l].policy);
        GRACE_CHECK_ARG(policy == RoutingPolicy::kWrr || policy == RoutingPolicy::kTar,
                        "--adapt re-predicts WRR weights, so it needs the wrr or tar routing policy; layer ", l,
                        " routes with ", to_string(policy));
    }
    const int64_t T = trace.num_tokens;
    Replayer replayer(plan, T, replay);
    const ExpertPlan& p = replayer.plan();  // finalized
    const int G = p.topology.num_gpus(), L = p.num_layers, k = trace.top_k;
    auto block_begin = [&](int g) { return static_cast<int64_t>((static_cast<__int128>(g) * T + G - 1) / G); };
    int64_t max_local = 0;
    for (int g = 0; g < G; ++g) max_local = std::max(max_local, block_begin(g + 1) - block_begin(g));
    const int64_t B = options.batch_tokens;
    const int64_t batches = max_local == 0 ? 0 : 1 + (max_local - 1) / B;  // no overflow for B near INT64_MAX

    AdaptiveReplay out;
    out.batches = batches;
    out.final_weights.resize(L);
    out.layer_hashes.resize(L);
    std::vector<std::exception_ptr> errors(L);
    std::vector<int> updates(L, 0);
    const int threads = replay.num_threads > 0 ? replay.num_threads : omp_get_max_threads();
    const size_t stride = static_cast<size_t>(L) * k;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int l = 0; l < L; ++l) {
        try {
            WrrAdapter adapter(p.layers[l], G, options);
            std::vector<int64_t> seen(adapter.num_instances(), 0);
            for (int64_t b = 0; b < batches; ++b) {
                for (int g = 0; g < G; ++g) {
                    const int64_t end = block_begin(g + 1);
                    const int64_t b0 = std::min(end, block_begin(g) + b * B), b1 = b0 + std::min(B, end - b0);
                    if (b1 > b0)
                        replayer.consume_layer_ids(
                            trace.expert_ids.data() + static_cast<size_t>(b0) * stride + static_cast<size_t>(l) * k,
                            stride, b1 - b0, k, b0, l);
                }
                if (!adapter.due(b)) continue;
                std::vector<int64_t> now = replayer.instance_selections(l), interval(now.size());
                for (size_t i = 0; i < now.size(); ++i) interval[i] = now[i] - seen[i];
                seen = std::move(now);
                replayer.set_wrr_weights(l, adapter.update(interval));
            }
            out.final_weights[l] = adapter.weights();
            out.layer_hashes[l] = adapter.tables_hash();
            updates[l] = adapter.updates();
        } catch (...) {
            errors[l] = std::current_exception();
        }
    }
    for (const auto& e : errors)
        if (e) std::rethrow_exception(e);
    out.updates = L > 0 ? updates[0] : 0;
    out.counts = replayer.counts();
    return out;
}

}  // namespace grace
