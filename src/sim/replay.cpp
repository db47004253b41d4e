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

// A WRR/TAR pick sequence of one (source GPU, expert) pair, with the counter ReplicaRouter would keep for it.
struct SequenceState {
    const uint8_t* seq = nullptr;
    int offset = 0;
    int inst_begin = 0;
    const int* gpus = nullptr;
};

// Counters of one layer. Routing goes through a [G, E] table built from the layer's ReplicaRouter: an entry
// >= 0 is a fixed pick, (global instance index << 8) | GPU (one instance, primary routing, SGLang static, or a
// WRR/TAR sequence that never changes, e.g. TAR's same-GPU tier); an entry <= -2 is sequence -entry-2 of
// `sequences` (the router's own period-Q pick sequence, with the same counter); -1 asks the router itself
// (the token-dependent policies). The matrices keep the diagonal while counting (cheaper than a branch per
// selection) and drop it in counts().
constexpr int kMaxMaskGpus = 12;

struct LayerState {
    const LayerPlan* plan = nullptr;
    std::unique_ptr<ReplicaRouter> router;
    int period = 0;
    std::vector<int32_t> table;  // [G*E]
    std::vector<SequenceState> sequences;
    std::vector<int> inst_begin;    // [E+1]: offsets into the instance list
    std::vector<int> inst_gpu;      // [instances]: GPU of each instance
    std::vector<int64_t> src_inst;  // [G, instances]: selections from source GPU to instance
    // Destination sets: for G <= kMaxMaskGpus a histogram [G, 2^G] of (home GPU, destination-GPU bit set), turned
    // into flat-dedup and hsc copies once at the end; above that, the matrices directly (with stamps).
    std::vector<int64_t> mask_hist;
    std::vector<int64_t> dedup, hsc;  // [G*G], large G only
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
    GRACE_CHECK_ARG(G <= 256, "the evaluator supports up to 256 GPUs, the plan has ", G);
    const uint64_t seed = options.seed.value_or(p.seed);
    impl_->layers.resize(p.num_layers);
    auto routers = make_layer_routers(p, options.policy, seed, options.slot_maps);
    for (int l = 0; l < p.num_layers; ++l) {
        LayerState& st = impl_->layers[l];
        const LayerPlan& lp = p.layers[l];
        st.plan = &lp;
        const RoutingPolicy policy = options.policy.value_or(lp.policy);
        st.router = std::move(routers[l]);
        // The engine policies see a token's index among its home GPU's tokens (a rank's own batch).
        for (int g = 0; g < G; ++g)
            st.router->set_token_origin(g, static_cast<int64_t>((static_cast<__int128>(g) * total_tokens + G - 1) / G));
        st.period = lp.wrr_period;
        st.inst_begin.assign(E + 1, 0);
        for (int e = 0; e < E; ++e)
            st.inst_begin[e + 1] = st.inst_begin[e] + static_cast<int>(lp.instance_gpus[e].size());
        st.table.assign(static_cast<size_t>(G) * E, -1);
        for (int src = 0; src < G; ++src)
            for (int e = 0; e < E; ++e) {
                const auto& gpus = lp.instance_gpus[e];
                int32_t& entry = st.table[static_cast<size_t>(src) * E + e];
                auto fixed = [&](int idx) { entry = ((st.inst_begin[e] + idx) << 8) | gpus[idx]; };
                if (gpus.size() == 1 || policy == RoutingPolicy::kPrimary) {
                    fixed(0);
                } else if (st.router->fixed_per_source()) {
                    st.router->route(src, e, 0, 0, p.top_k);
                    fixed(st.router->last_instance());
                } else if (policy == RoutingPolicy::kWrr || policy == RoutingPolicy::kTar) {
                    const uint8_t* seq = st.router->sequence(src, e);
                    if (std::all_of(seq, seq + st.period, [&](uint8_t v) { return v == seq[0]; })) {
                        fixed(seq[0]);
                    } else {
                        entry = -2 - static_cast<int32_t>(st.sequences.size());
                        st.sequences.push_back({seq, 0, st.inst_begin[e], gpus.data()});
                    }
                }
            }
        st.inst_gpu.resize(st.inst_begin[E]);
        for (int e = 0; e < E; ++e)
            for (size_t i = 0; i < lp.instance_gpus[e].size(); ++i)
                st.inst_gpu[st.inst_begin[e] + i] = lp.instance_gpus[e][i];
        st.src_inst.assign(static_cast<size_t>(G) * st.inst_begin[E], 0);
        if (G <= kMaxMaskGpus) {
            st.mask_hist.assign(static_cast<size_t>(G) << G, 0);
        } else {
            const size_t g2 = static_cast<size_t>(G) * G;
            st.dedup.assign(g2, 0);
            st.hsc.assign(g2, 0);
            st.gpu_stamp.assign(G, -1);
            st.node_stamp.assign(p.topology.nodes, -1);
        }
    }
}

Replayer::~Replayer() = default;
Replayer::Replayer(Replayer&&) noexcept = default;
Replayer& Replayer::operator=(Replayer&&) noexcept = default;

const ExpertPlan& Replayer::plan() const { return impl_->plan; }

void Replayer::consume_layer(const RoutingTrace& chunk, int64_t first_token, int layer) {
    const ExpertPlan& p = impl_->plan;
    GRACE_CHECK_INPUT(chunk.num_experts == p.num_experts, "the trace has ", chunk.num_experts,
                      " experts but the plan has ", p.num_experts);
    GRACE_CHECK_INPUT(chunk.num_layers == p.num_layers, "the trace has ", chunk.num_layers, " layers but the plan has ",
                      p.num_layers);
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    consume_layer_ids(chunk.expert_ids.data() + static_cast<size_t>(layer) * chunk.top_k,
                      static_cast<size_t>(chunk.num_layers) * chunk.top_k, chunk.num_tokens, chunk.top_k, first_token,
                      layer);
}

void Replayer::consume_layer_ids(const int32_t* ids, size_t stride, int64_t n, int k, int64_t first_token, int layer) {
    const ExpertPlan& p = impl_->plan;
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    GRACE_CHECK_ARG(k >= 1 && k <= 64, "top_k ", k, " is outside the evaluator's [1, 64]");
    LayerState& st = impl_->layers[layer];
    GRACE_CHECK_ARG(first_token == st.next_token, "layer ", layer, ": expected token ", st.next_token, " next, got ",
                    first_token);
    const int64_t T = impl_->total_tokens;
    GRACE_CHECK_INPUT(first_token + n <= T, "the trace has more tokens than the ", T, " the replay was set up for");
    if (n == 0) return;
    const Topology& topo = p.topology;
    const int G = topo.num_gpus();
    const int M = topo.gpus_per_node;
    const int32_t* table = st.table.data();
    SequenceState* sequences = st.sequences.data();
    const int period = st.period;
    const int E = p.num_experts;
    const int num_inst = st.inst_begin[E];
    const int* inst_begin = st.inst_begin.data();
    ReplicaRouter& router = *st.router;
    const bool use_mask = G <= kMaxMaskGpus;
    int dst[64];
    int h = home_gpu(first_token, T, G);
    // First token of GPU h+1: the smallest t with floor(t*G/T) >= h+1.
    auto block_begin = [&](int g) { return static_cast<int64_t>((static_cast<__int128>(g) * T + G - 1) / G); };
    int64_t next_home = block_begin(h + 1);
    for (int64_t i = 0; i < n; ++i, ids += stride) {
        const int64_t t = first_token + i;
        while (t >= next_home) next_home = block_begin(++h + 1);
        const int32_t* row = table + static_cast<size_t>(h) * E;
        int64_t* src_row = st.src_inst.data() + static_cast<size_t>(h) * num_inst;
        uint32_t mask = 0;
        int u = 0;
        for (int j = 0; j < k; ++j) {
            const int e = ids[j];
            const int32_t entry = row[e];
            int d, inst;
            if (entry >= 0) {
                d = entry & 0xff;
                inst = entry >> 8;
            } else if (entry <= -2) {
                SequenceState& sq = sequences[-2 - entry];
                const int pick = sq.seq[sq.offset];
                if (++sq.offset == period) sq.offset = 0;
                d = sq.gpus[pick];
                inst = sq.inst_begin + pick;
            } else {
                d = router.route(h, e, t, j, k);
                inst = inst_begin[e] + router.last_instance();
            }
            ++src_row[inst];
            if (use_mask) {
                mask |= 1u << d;
            } else if (st.gpu_stamp[d] != t) {
                st.gpu_stamp[d] = t;
                dst[u++] = d;
            }
        }
        if (use_mask) {
            ++st.mask_hist[(static_cast<size_t>(h) << G) | mask];
            continue;
        }
        const int hn = h / M, hl = h % M;
        int64_t* dedup_row = st.dedup.data() + static_cast<size_t>(h) * G;
        for (int a = 0; a < u; ++a) {
            const int d = dst[a];
            ++dedup_row[d];
            const int dn = d / M;
            if (dn == hn) {
                ++st.hsc[static_cast<size_t>(h) * G + d];
            } else {
                const int peer = dn * M + hl;
                if (st.node_stamp[dn] != t) {
                    st.node_stamp[dn] = t;
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
    GRACE_CHECK_INPUT(chunk.num_experts == impl_->plan.num_experts, "the trace has ", chunk.num_experts,
                      " experts but the plan has ", impl_->plan.num_experts);
    GRACE_CHECK_INPUT(chunk.num_layers == L, "the trace has ", chunk.num_layers, " layers but the plan has ", L);
    GRACE_CHECK_INPUT(chunk.top_k <= 64, "top_k ", chunk.top_k, " exceeds the evaluator's limit of 64");
    const int threads = impl_->num_threads > 0 ? impl_->num_threads : omp_get_max_threads();
    const LayerMajorIds lm(chunk, threads);
    std::vector<std::string> errors(L);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (L > 1)
    for (int l = 0; l < L; ++l) {
        try {
            consume_layer_ids(lm.layer(l), chunk.top_k, chunk.num_tokens, chunk.top_k, first_token, l);
        } catch (const std::exception& e) {
            errors[l] = e.what();
        }
    }
    for (const auto& e : errors) GRACE_CHECK_INPUT(e.empty(), e);
}

LayerMajorIds::LayerMajorIds(const RoutingTrace& chunk, int num_threads)
    : num_tokens_(chunk.num_tokens), top_k_(chunk.top_k) {
    const int L = chunk.num_layers, k = chunk.top_k;
    const int64_t n = chunk.num_tokens;
    ids_.resize(static_cast<size_t>(n) * L * k);
    // Tiles of tokens keep both the reads and the L write streams inside the cache.
    constexpr int64_t kTile = 256;
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 4 * kTile)
    for (int64_t b = 0; b < n; b += kTile) {
        const int64_t e = std::min(n, b + kTile);
        for (int l = 0; l < L; ++l) {
            int32_t* out = ids_.data() + (static_cast<size_t>(l) * n + b) * k;
            const int32_t* in = chunk.expert_ids.data() + (static_cast<size_t>(b) * L + l) * k;
            for (int64_t t = b; t < e; ++t, out += k, in += static_cast<size_t>(L) * k) std::copy(in, in + k, out);
        }
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
        LayerCounts& c = out[l];
        c.layer = l;
        c.num_tokens = st.next_token;
        const int num_inst = st.inst_begin[E];
        std::vector<int64_t> flat(static_cast<size_t>(G) * G, 0), inst_total(num_inst, 0);
        for (int h = 0; h < G; ++h)
            for (int i = 0; i < num_inst; ++i) {
                const int64_t v = st.src_inst[static_cast<size_t>(h) * num_inst + i];
                flat[static_cast<size_t>(h) * G + st.inst_gpu[i]] += v;
                inst_total[i] += v;
            }
        c.instance_load.resize(E);
        c.gpu_load.assign(G, 0);
        for (int e = 0; e < E; ++e)
            c.instance_load[e].assign(inst_total.begin() + st.inst_begin[e], inst_total.begin() + st.inst_begin[e + 1]);
        for (int i = 0; i < num_inst; ++i) c.gpu_load[st.inst_gpu[i]] += inst_total[i];
        for (int g = 0; g < G; ++g) c.local_selections += flat[static_cast<size_t>(g) * G + g];
        std::vector<int64_t> dedup = st.dedup, hsc = st.hsc;
        if (!st.mask_hist.empty()) {
            const int M = topo.gpus_per_node;
            dedup.assign(static_cast<size_t>(G) * G, 0);
            hsc.assign(static_cast<size_t>(G) * G, 0);
            for (int h = 0; h < G; ++h)
                for (uint32_t mask = 1; mask < (1u << G); ++mask) {
                    const int64_t cnt = st.mask_hist[(static_cast<size_t>(h) << G) | mask];
                    if (cnt == 0) continue;
                    for (int d = 0; d < G; ++d)
                        if (mask >> d & 1) dedup[static_cast<size_t>(h) * G + d] += cnt;
                    for (int b = 0; b < topo.nodes; ++b) {
                        const uint32_t in_b = (mask >> (b * M)) & ((1u << M) - 1);
                        if (in_b == 0) continue;
                        // Home node: straight to each GPU; remote node: one copy to the peer, which forwards.
                        const int from = b == h / M ? h : b * M + h % M;
                        if (from != h) hsc[static_cast<size_t>(h) * G + from] += cnt;
                        for (int loc = 0; loc < M; ++loc)
                            if (in_b >> loc & 1) hsc[static_cast<size_t>(from) * G + b * M + loc] += cnt;
                    }
                }
        }
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
        build(flat, c.flat);
        build(dedup, c.flat_dedup);
        build(hsc, c.hsc);
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
