#include <omp.h>

#include <algorithm>

#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/routing.hpp"

namespace grace {

const TrafficMatrix& LayerCounts::traffic(CommScheme scheme) const {
    switch (scheme) {
        case CommScheme::kFlatDedup:
            return flat_dedup;
        case CommScheme::kHsc:
            return hsc;
        case CommScheme::kFlat:
        case CommScheme::k2dh:
            break;
    }
    return flat;
}

namespace {

// Counters of one layer. The matrices keep the diagonal while counting (it is cheaper than a branch per
// selection) and drop it in counts().
struct LayerState {
    const LayerPlan* plan = nullptr;
    std::unique_ptr<ReplicaRouter> router;
    std::vector<int> single_gpu;     // [E]: the GPU when routing needs no router (one instance / primary), else -1
    std::vector<int> inst_begin;     // [E+1]: offsets into inst_load
    std::vector<int64_t> inst_load;  // [instances]
    std::vector<int64_t> flat, dedup, hsc;  // [G*G]
    std::vector<int64_t> gpu_stamp, node_stamp;
    int64_t next_token = 0;
};

}  // namespace

struct Replayer::Impl {
    ExpertPlan plan;
    int64_t total_tokens = 0;
    int num_threads = 0;
    std::vector<LayerState> layers;
};

Replayer::Replayer(const ExpertPlan& plan, int64_t total_tokens, const ReplayOptions& options)
    : impl_(std::make_unique<Impl>()) {
    GRACE_CHECK_ARG(total_tokens >= 1, "replay needs at least one token, got ", total_tokens);
    impl_->plan = plan;
    ExpertPlan& p = impl_->plan;
    const int E = p.num_experts;
    for (auto& lp : p.layers)
        if (static_cast<int>(lp.instance_gpus.size()) != E) lp.finalize(E);
    p.validate();
    impl_->total_tokens = total_tokens;
    impl_->num_threads = options.num_threads;
    const int G = p.topology.num_gpus();
    const uint64_t seed = options.seed.value_or(p.seed);
    impl_->layers.resize(p.num_layers);
    for (int l = 0; l < p.num_layers; ++l) {
        LayerState& st = impl_->layers[l];
        const LayerPlan& lp = p.layers[l];
        st.plan = &lp;
        const RoutingPolicy policy = options.policy.value_or(lp.policy);
        st.router = std::make_unique<ReplicaRouter>(lp, p.topology, policy, seed);
        st.single_gpu.assign(E, -1);
        st.inst_begin.assign(E + 1, 0);
        for (int e = 0; e < E; ++e) {
            const auto& gpus = lp.instance_gpus[e];
            if (gpus.size() == 1 || policy == RoutingPolicy::kPrimary) st.single_gpu[e] = gpus[0];
            st.inst_begin[e + 1] = st.inst_begin[e] + static_cast<int>(gpus.size());
        }
        st.inst_load.assign(st.inst_begin[E], 0);
        const size_t g2 = static_cast<size_t>(G) * G;
        st.flat.assign(g2, 0);
        st.dedup.assign(g2, 0);
        st.hsc.assign(g2, 0);
        st.gpu_stamp.assign(G, -1);
        st.node_stamp.assign(p.topology.nodes, -1);
    }
}

Replayer::~Replayer() = default;
Replayer::Replayer(Replayer&&) noexcept = default;
Replayer& Replayer::operator=(Replayer&&) noexcept = default;

const ExpertPlan& Replayer::plan() const { return impl_->plan; }

void Replayer::consume_layer(const RoutingTrace& chunk, int64_t first_token, int layer) {
    const ExpertPlan& p = impl_->plan;
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    GRACE_CHECK_INPUT(chunk.num_experts == p.num_experts, "the trace has ", chunk.num_experts,
                      " experts but the plan has ", p.num_experts);
    GRACE_CHECK_INPUT(chunk.num_layers == p.num_layers, "the trace has ", chunk.num_layers, " layers but the plan has ",
                      p.num_layers);
    LayerState& st = impl_->layers[layer];
    GRACE_CHECK_ARG(first_token == st.next_token, "layer ", layer, ": expected token ", st.next_token, " next, got ",
                    first_token);
    const int64_t T = impl_->total_tokens;
    const int64_t n = chunk.num_tokens;
    GRACE_CHECK_INPUT(first_token + n <= T, "the trace has more tokens than the ", T, " the replay was set up for");
    if (n == 0) return;
    const Topology& topo = p.topology;
    const int G = topo.num_gpus();
    const int M = topo.gpus_per_node;
    const int k = chunk.top_k;
    const int L = chunk.num_layers;
    const int* single = st.single_gpu.data();
    const int* inst_begin = st.inst_begin.data();
    int64_t* inst_load = st.inst_load.data();
    int64_t* gpu_stamp = st.gpu_stamp.data();
    int64_t* node_stamp = st.node_stamp.data();
    ReplicaRouter& router = *st.router;
    int dst[64];
    int h = home_gpu(first_token, T, G);
    // First token of GPU h+1: the smallest t with floor(t*G/T) >= h+1.
    auto block_begin = [&](int g) { return static_cast<int64_t>((static_cast<__int128>(g) * T + G - 1) / G); };
    int64_t next_home = block_begin(h + 1);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t t = first_token + i;
        while (t >= next_home) next_home = block_begin(++h + 1);
        const int hn = h / M, hl = h % M;
        const int32_t* ids = chunk.expert_ids.data() + (i * L + layer) * k;
        int64_t* flat_row = st.flat.data() + static_cast<size_t>(h) * G;
        int u = 0;
        for (int j = 0; j < k; ++j) {
            const int e = ids[j];
            int d = single[e];
            int inst = inst_begin[e];
            if (d < 0) {
                d = router.route(h, e, t, j, k);
                inst += router.last_instance();
            }
            ++inst_load[inst];
            ++flat_row[d];
            if (gpu_stamp[d] != t) {
                gpu_stamp[d] = t;
                dst[u++] = d;
            }
        }
        int64_t* dedup_row = st.dedup.data() + static_cast<size_t>(h) * G;
        for (int a = 0; a < u; ++a) {
            const int d = dst[a];
            ++dedup_row[d];
            const int dn = d / M;
            if (dn == hn) {
                ++st.hsc[static_cast<size_t>(h) * G + d];
            } else {
                const int peer = dn * M + hl;
                if (node_stamp[dn] != t) {
                    node_stamp[dn] = t;
                    ++st.hsc[static_cast<size_t>(h) * G + peer];
                }
                if (d != peer) ++st.hsc[static_cast<size_t>(peer) * G + d];
            }
        }
    }
    st.next_token = first_token + n;
}

void Replayer::consume(const RoutingTrace& chunk, int64_t first_token) {
    const int L = impl_->plan.num_layers;
    GRACE_CHECK_INPUT(chunk.num_layers == L, "the trace has ", chunk.num_layers, " layers but the plan has ", L);
    GRACE_CHECK_INPUT(chunk.top_k <= 64, "top_k ", chunk.top_k, " exceeds the evaluator's limit of 64");
    std::vector<std::string> errors(L);
    const int threads = impl_->num_threads > 0 ? impl_->num_threads : 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : omp_get_max_threads()) if (L > 1)
    for (int l = 0; l < L; ++l) {
        try {
            consume_layer(chunk, first_token, l);
        } catch (const std::exception& e) {
            errors[l] = e.what();
        }
    }
    for (int l = 0; l < L; ++l)
        if (!errors[l].empty()) {
            // Re-run serially to rethrow with the original code.
            consume_layer(chunk, first_token, l);
        }
}

std::vector<LayerCounts> Replayer::counts() const {
    const ExpertPlan& p = impl_->plan;
    const Topology& topo = p.topology;
    const int G = topo.num_gpus();
    const int E = p.num_experts;
    std::vector<LayerCounts> out(p.num_layers);
    for (int l = 0; l < p.num_layers; ++l) {
        const LayerState& st = impl_->layers[l];
        const LayerPlan& lp = *st.plan;
        LayerCounts& c = out[l];
        c.layer = l;
        c.num_tokens = st.next_token;
        c.instance_load.resize(E);
        c.gpu_load.assign(G, 0);
        for (int e = 0; e < E; ++e) {
            c.instance_load[e].assign(st.inst_load.begin() + st.inst_begin[e], st.inst_load.begin() + st.inst_begin[e + 1]);
            for (size_t i = 0; i < lp.instance_gpus[e].size(); ++i) c.gpu_load[lp.instance_gpus[e][i]] += c.instance_load[e][i];
        }
        for (int g = 0; g < G; ++g) c.local_selections += st.flat[static_cast<size_t>(g) * G + g];
        auto build = [&](const std::vector<int64_t>& raw, TrafficMatrix& m) {
            m.num_gpus = G;
            m.copies = raw;
            for (int s = 0; s < G; ++s) {
                m.copies[static_cast<size_t>(s) * G + s] = 0;
                for (int d = 0; d < G; ++d) {
                    if (s == d) continue;
                    const int64_t v = m.copies[static_cast<size_t>(s) * G + d];
                    (topo.node_of(s) == topo.node_of(d) ? m.intra_node_copies : m.cross_node_copies) += v;
                }
            }
        };
        build(st.flat, c.flat);
        build(st.dedup, c.flat_dedup);
        build(st.hsc, c.hsc);
    }
    return out;
}

void check_plan_matches_trace(const ExpertPlan& plan, const RoutingTrace& trace) {
    GRACE_CHECK_INPUT(plan.num_experts == trace.num_experts, "the plan has ", plan.num_experts,
                      " experts but the trace has ", trace.num_experts);
    GRACE_CHECK_INPUT(plan.num_layers == trace.num_layers, "the plan has ", plan.num_layers,
                      " layers but the trace has ", trace.num_layers);
    GRACE_CHECK_INPUT(trace.top_k <= 64, "top_k ", trace.top_k, " exceeds the evaluator's limit of 64");
    GRACE_CHECK_INPUT(trace.num_tokens >= 1, "the trace is empty");
}

std::vector<LayerCounts> replay_trace(const RoutingTrace& trace, const ExpertPlan& plan, const ReplayOptions& options) {
    check_plan_matches_trace(plan, trace);
    Replayer r(plan, trace.num_tokens, options);
    r.consume(trace, 0);
    return r.counts();
}

TrafficMatrix count_traffic(const RoutingTrace& trace, const ExpertPlan& plan, RoutingPolicy policy, CommScheme scheme,
                            int layer, uint64_t seed) {
    check_plan_matches_trace(plan, trace);
    GRACE_CHECK_ARG(layer >= 0 && layer < plan.num_layers, "layer ", layer, " is outside [0, ", plan.num_layers, ")");
    ReplayOptions options;
    options.policy = policy;
    options.seed = seed;
    Replayer r(plan, trace.num_tokens, options);
    r.consume_layer(trace, 0, layer);
    return r.counts()[layer].traffic(scheme);
}

}  // namespace grace
