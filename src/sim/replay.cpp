#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

// A WRR/TAR pick sequence of one (source GPU, expert) pair, with the counter ReplicaRouter would keep for it (as
// the position `next`). [begin, end) holds the period's picks already resolved to (global instance index << 8) |
// GPU, so a pick is one load rather than a chain through the instance list.
struct SequenceState {
    const int32_t* next = nullptr;  // the next pick, in [begin, end)
    const int32_t* begin = nullptr;
    const int32_t* end = nullptr;
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
    std::vector<int32_t> sequence_entries;  // [sequences, period]
    bool dynamic = false;                   // some table entry is -1 (asks the router)
    std::vector<int> inst_begin;            // [E+1]: offsets into the instance list
    std::vector<int> inst_gpu;              // [instances]: GPU of each instance
    std::vector<int64_t> src_inst;          // [G, instances]: selections from source GPU to instance
    // Destination sets: for G <= kMaxMaskGpus a histogram [G, 2^G] of (home GPU, destination-GPU bit set), turned
    // into flat-dedup and hsc copies once at the end; above that, the matrices directly (with stamps).
    std::vector<int64_t> mask_hist;
    std::vector<int64_t> dedup, hsc;  // [G*G], large G only
    std::vector<int64_t> gpu_stamp, node_stamp;
    std::vector<int64_t> expert_stamp;  // [E]: last token that selected the expert (repeated-id check)
    int64_t next_token = 0;             // tokens replayed so far
    std::vector<int64_t> gpu_next;      // [G]: the next token of each home GPU's block (per-GPU order suffices)
};

// The id errors, worded as TraceReader's check words them (src/core/trace.cpp), for one (token, layer) row:
// the first position j whose id is out of range or repeats an earlier one.
[[noreturn]] void throw_bad_ids(const int32_t* row, int k, int num_experts, int64_t token, int layer) {
    for (int j = 0; j < k; ++j) {
        const int32_t e = row[j];
        GRACE_CHECK_INPUT(e >= 0 && e < num_experts, "expert id ", e, " at token ", token, ", layer ", layer,
                          " is out of range [0, ", num_experts, ")");
        for (int i = 0; i < j; ++i)
            GRACE_CHECK_INPUT(row[i] != e, "expert id ", e, " is repeated in the top-k of token ", token, ", layer ",
                              layer);
    }
    GRACE_ASSERT(false);
    std::abort();
}

// The first token of home GPU g in a batch of n tokens starting at token b: the smallest t with
// floor((t-b)*G/n) >= g.
int64_t home_block_begin(int64_t b, int64_t n, int g, int G) {
    return b + static_cast<int64_t>((static_cast<__int128>(g) * n + G - 1) / G);
}

}  // namespace

struct Replayer::Impl {
    ExpertPlan plan;
    int64_t total_tokens = 0;
    int num_threads = 0;
    std::vector<LayerState> layers;
    int64_t batch_begin = 0, batch_tokens = 0;  // the current batch (default: the whole trace)
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
    impl_->batch_tokens = total_tokens;
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
        for (int g = 0; g < G; ++g) st.router->set_token_origin(g, home_block_begin(0, total_tokens, g, G));
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
                        st.sequences.push_back({});
                        for (int o = 0; o < st.period; ++o)
                            st.sequence_entries.push_back(((st.inst_begin[e] + seq[o]) << 8) | gpus[seq[o]]);
                    }
                }
            }
        st.dynamic = std::find(st.table.begin(), st.table.end(), -1) != st.table.end();
        for (size_t i = 0; i < st.sequences.size(); ++i)
            st.sequences[i] = {st.sequence_entries.data() + i * st.period, st.sequence_entries.data() + i * st.period,
                               st.sequence_entries.data() + (i + 1) * st.period};
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
        st.expert_stamp.assign(E, -1);
        st.gpu_next.resize(G);
        for (int g = 0; g < G; ++g)
            st.gpu_next[g] = static_cast<int64_t>((static_cast<__int128>(g) * total_tokens + G - 1) / G);
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

namespace {

// The token loop of replay_layer, specialized on the destination bookkeeping (kMask: the [G, 2^G] histogram
// of small topologies), on k (kK > 0: a compile-time top-k, 0: `k`) and on whether any pick asks the router
// itself (kDynamic: token-dependent policies; without the call the loop's state stays in registers).
// Returns as replay_layer.
template <bool kMask, int kK, bool kDynamic>
int64_t replay_tokens(LayerState& st, const ExpertPlan& p, int64_t batch_begin, int64_t batch_tokens,
                      const int32_t* ids, size_t stride, int64_t n, int k_runtime, int64_t first_token) {
    const int k = kK > 0 ? kK : k_runtime;
    const Topology& topo = p.topology;
    const int G = topo.num_gpus();
    const int M = topo.gpus_per_node;
    const int32_t* table = st.table.data();
    SequenceState* sequences = st.sequences.data();
    const int E = p.num_experts;
    const int num_inst = st.inst_begin[E];
    const int* inst_begin = st.inst_begin.data();
    int64_t* expert_stamp = st.expert_stamp.data();
    int64_t* src_inst = st.src_inst.data();
    int64_t* mask_hist = st.mask_hist.data();
    ReplicaRouter& router = *st.router;
    int dst[64];
    int h = home_gpu(first_token - batch_begin, batch_tokens, G);
    auto block_begin = [&](int g) { return home_block_begin(batch_begin, batch_tokens, g, G); };
    int64_t next_home = block_begin(h + 1);
    const int64_t end = first_token + n;
    for (int64_t t = first_token; t < end;) {
        while (t >= next_home) next_home = block_begin(++h + 1);
        // Tokens t .. block_end - 1 share the home GPU h, hence the routing row and the counter row.
        const int64_t block_end = std::min(end, next_home);
        const int32_t* row = table + static_cast<size_t>(h) * E;
        int64_t* src_row = src_inst + static_cast<size_t>(h) * num_inst;
        int64_t* hist_row = kMask ? mask_hist + (static_cast<size_t>(h) << G) : nullptr;
        for (; t < block_end; ++t, ids += stride) {
            uint32_t mask = 0;
            int u = 0;
            for (int j = 0; j < k; ++j) {
                const int e = ids[j];
                if (static_cast<uint32_t>(e) >= static_cast<uint32_t>(E) || expert_stamp[e] == t) return t;
                expert_stamp[e] = t;
                const int32_t entry = row[e];
                int d, inst;
                if (entry >= 0) {
                    d = entry & 0xff;
                    inst = entry >> 8;
                } else if (entry <= -2) {
                    SequenceState& sq = sequences[-2 - entry];
                    const int32_t picked = *sq.next;
                    if (++sq.next == sq.end) sq.next = sq.begin;
                    d = picked & 0xff;
                    inst = picked >> 8;
                } else if constexpr (kDynamic) {
                    d = router.route(h, e, t, j, k);
                    inst = inst_begin[e] + router.last_instance();
                } else {
                    GRACE_ASSERT(false);  // the table has no router entries (LayerState::dynamic)
                }
                ++src_row[inst];
                if constexpr (kMask) {
                    mask |= 1u << d;
                } else if (st.gpu_stamp[d] != t) {
                    st.gpu_stamp[d] = t;
                    dst[u++] = d;
                }
            }
            if constexpr (kMask) {
                ++hist_row[mask];
            } else {
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
        }
    }
    return -1;
}

// Replays tokens first_token .. first_token + n - 1 of one layer, checking each id while routing it (in range,
// not repeated within the token's top-k). Returns -1, or the trace index of the first token with a bad id: the
// replay stops there, with that layer's counts part-way through the token.
int64_t replay_layer(LayerState& st, const ExpertPlan& p, int64_t batch_begin, int64_t batch_tokens, int64_t T,
                     const int32_t* ids, size_t stride, int64_t n, int k, int64_t first_token, int layer) {
    GRACE_CHECK_ARG(k >= 1 && k <= 64, "top_k ", k, " is outside the evaluator's [1, 64]");
    GRACE_CHECK_INPUT(first_token + n <= T, "the trace has more tokens than the ", T, " the replay was set up for");
    GRACE_CHECK_ARG(first_token + n <= batch_begin + batch_tokens, "tokens up to ", first_token + n - 1,
                    " run past the batch of tokens ", batch_begin, "..", batch_begin + batch_tokens - 1);
    if (n == 0) return -1;
    const int64_t b0 = batch_begin, bn = batch_tokens;
    // Tokens must come in order per home GPU within the batch (the routing state is per source GPU): trace order,
    // or each GPU's block of the batch in turn as the runtimes feed it (replay_adaptive).
    const int G = p.topology.num_gpus();
    const int h_first = home_gpu(first_token - b0, bn, G), h_last = home_gpu(first_token + n - 1 - b0, bn, G);
    auto block_begin = [&](int g) { return home_block_begin(b0, bn, g, G); };
    for (int g = h_first; g <= h_last; ++g) {
        const int64_t want = st.gpu_next[g], got = g == h_first ? first_token : block_begin(g);
        GRACE_CHECK_ARG(got == want, "layer ", layer, ": expected token ", want, " next, got ", got);
    }
    int64_t bad;
    if (p.topology.num_gpus() > kMaxMaskGpus)
        bad = replay_tokens<false, 0, true>(st, p, b0, bn, ids, stride, n, k, first_token);
    else if (st.dynamic)
        bad = replay_tokens<true, 0, true>(st, p, b0, bn, ids, stride, n, k, first_token);
    else if (k == 8)
        bad = replay_tokens<true, 8, false>(st, p, b0, bn, ids, stride, n, k, first_token);
    else
        bad = replay_tokens<true, 0, false>(st, p, b0, bn, ids, stride, n, k, first_token);
    const int64_t stop = bad >= 0 ? bad : first_token + n;  // after a bad id the layer's counts are no longer usable
    st.next_token += stop - first_token;
    for (int g = h_first; g <= h_last; ++g)
        st.gpu_next[g] = std::max(st.gpu_next[g], std::min(stop, block_begin(g + 1)));
    return bad;
}

}  // namespace

void Replayer::consume_layer_ids(const int32_t* ids, size_t stride, int64_t n, int k, int64_t first_token, int layer) {
    const ExpertPlan& p = impl_->plan;
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    const int64_t bad = replay_layer(impl_->layers[layer], p, impl_->batch_begin, impl_->batch_tokens,
                                     impl_->total_tokens, ids, stride, n, k, first_token, layer);
    if (bad >= 0) throw_bad_ids(ids + static_cast<size_t>(bad - first_token) * stride, k, p.num_experts, bad, layer);
}

namespace {

// Bytes of ids per tile of consume(): a quarter of a 1 MiB L2, so the tile stays cached while every layer
// reads its share (256 KiB measured best against 1 and 4 MiB for qwen3-30b-a3b, bench/results/eval.md).
constexpr int64_t kTileBytes = int64_t{1} << 18;

/// Copies `chunk`'s ids [T, L, k] into `out` as [L, T, k] with `threads` threads. `out` is only resized, so a
/// buffer reused across chunks of one size is neither reallocated nor zeroed.
void transpose_layer_major(const RoutingTrace& chunk, int threads, std::vector<int32_t>& out) {
    const int L = chunk.num_layers, k = chunk.top_k;
    const int64_t n = chunk.num_tokens;
    out.resize(static_cast<size_t>(n) * L * k);
    // Tiles of tokens keep both the reads and the L write streams inside the cache.
    constexpr int64_t kTile = 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 4 * kTile)
    for (int64_t b = 0; b < n; b += kTile) {
        const int64_t e = std::min(n, b + kTile);
        for (int l = 0; l < L; ++l) {
            int32_t* dst = out.data() + (static_cast<size_t>(l) * n + b) * k;
            const int32_t* in = chunk.expert_ids.data() + (static_cast<size_t>(b) * L + l) * k;
            if (k == 8) {  // the common top-k: a fixed-size copy the compiler inlines (not a memmove call per row)
                for (int64_t t = b; t < e; ++t, dst += 8, in += static_cast<size_t>(L) * 8) std::memcpy(dst, in, 32);
            } else {
                for (int64_t t = b; t < e; ++t, dst += k, in += static_cast<size_t>(L) * k)
                    std::memcpy(dst, in, sizeof(int32_t) * k);
            }
        }
    }
}

}  // namespace

void Replayer::consume(const RoutingTrace& chunk, int64_t first_token) {
    consume_range(chunk, first_token, 0, chunk.num_tokens);
}

void Replayer::consume_range(const RoutingTrace& chunk, int64_t first_token, int64_t begin, int64_t count) {
    GRACE_CHECK_ARG(begin >= 0 && count >= 0 && begin <= chunk.num_tokens - count, "tokens ", begin, " + ", count,
                    " are outside the chunk of ", chunk.num_tokens);
    const ExpertPlan& p = impl_->plan;
    const int L = p.num_layers;
    GRACE_CHECK_INPUT(chunk.num_experts == p.num_experts, "the trace has ", chunk.num_experts,
                      " experts but the plan has ", p.num_experts);
    GRACE_CHECK_INPUT(chunk.num_layers == L, "the trace has ", chunk.num_layers, " layers but the plan has ", L);
    GRACE_CHECK_INPUT(chunk.top_k <= 64, "top_k ", chunk.top_k, " exceeds the evaluator's limit of 64");
    const int threads = std::max(1, std::min(impl_->num_threads > 0 ? impl_->num_threads : omp_get_max_threads(), L));
    const int k = chunk.top_k;
    const int64_t n = count;
    const size_t row = static_cast<size_t>(L) * k;  // ids per token
    const int32_t* ids = chunk.expert_ids.data() + static_cast<size_t>(begin) * row;
    first_token += begin;
    // Tiles of tokens small enough to stay in a core's cache: each layer's replay then reads its ids (k of every
    // L * k) from cache instead of memory, with no layer-major copy. Thread i owns layers i, i + threads, ...
    // for the whole chunk, so every layer still sees its tokens in order.
    const int64_t tile = std::max<int64_t>(64, kTileBytes / static_cast<int64_t>(row * sizeof(int32_t)));
    std::vector<std::string> errors(L);
    std::vector<int64_t> bad(L, -1);
    // A small range (a decode batch) replays on this thread: the cost of waking and joining the others, paid
    // once per batch, would outweigh the work (and it stalls whenever the machine is oversubscribed).
    constexpr int64_t kMinParallelSelections = int64_t{1} << 20;
    const bool parallel = threads > 1 && n * static_cast<int64_t>(row) >= kMinParallelSelections;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t b = 0; b < n; b += tile) {
            const int64_t m = std::min(tile, n - b);
            for (int l = tid; l < L; l += nt) {
                if (bad[l] >= 0 || !errors[l].empty()) continue;
                try {
                    bad[l] = replay_layer(
                        impl_->layers[l], p, impl_->batch_begin, impl_->batch_tokens, impl_->total_tokens,
                        ids + static_cast<size_t>(b) * row + static_cast<size_t>(l) * k, row, m, k, first_token + b, l);
                } catch (const std::exception& e) {
                    errors[l] = e.what();
                }
            }
        }
    }
    for (const auto& e : errors) GRACE_CHECK_INPUT(e.empty(), e);
    // The first bad (token, layer) in trace order, whatever the thread count: the one TraceReader would report.
    int bad_layer = -1;
    for (int l = 0; l < L; ++l)
        if (bad[l] >= 0 && (bad_layer < 0 || bad[l] < bad[bad_layer])) bad_layer = l;
    if (bad_layer >= 0) {
        const int64_t t = bad[bad_layer];
        throw_bad_ids(ids + static_cast<size_t>(t - first_token) * row + static_cast<size_t>(bad_layer) * k, k,
                      p.num_experts, t, bad_layer);
    }
}

void Replayer::begin_batch(int64_t first_token, int64_t num_tokens) {
    GRACE_CHECK_ARG(num_tokens >= 1, "a batch needs at least one token, got ", num_tokens);
    GRACE_CHECK_ARG(first_token >= 0 && first_token <= impl_->total_tokens - num_tokens, "the batch of ", num_tokens,
                    " tokens from token ", first_token, " runs past the ", impl_->total_tokens,
                    " tokens the replay was set up for");
    const int G = impl_->plan.topology.num_gpus();
    for (size_t l = 0; l < impl_->layers.size(); ++l) {
        LayerState& st = impl_->layers[l];
        GRACE_CHECK_ARG(st.next_token == first_token, "layer ", l, ": a batch from token ", first_token,
                        " cannot start at token ", st.next_token);
        std::fill(st.src_inst.begin(), st.src_inst.end(), 0);
        std::fill(st.mask_hist.begin(), st.mask_hist.end(), 0);
        std::fill(st.dedup.begin(), st.dedup.end(), 0);
        std::fill(st.hsc.begin(), st.hsc.end(), 0);
        for (int g = 0; g < G; ++g) {
            st.router->set_token_origin(g, home_block_begin(first_token, num_tokens, g, G));
            st.gpu_next[g] = home_block_begin(first_token, num_tokens, g, G);
        }
    }
    impl_->batch_begin = first_token;
    impl_->batch_tokens = num_tokens;
}

LayerMajorIds::LayerMajorIds(const RoutingTrace& chunk, int num_threads)
    : num_tokens_(chunk.num_tokens), top_k_(chunk.top_k) {
    transpose_layer_major(chunk, num_threads > 0 ? num_threads : omp_get_max_threads(), ids_);
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
        c.num_tokens = st.next_token - impl_->batch_begin;
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
                    // Over the set bits only: a batch's counts are taken once per batch, small batches included.
                    for (uint32_t rest = mask; rest != 0; rest &= rest - 1)
                        dedup[static_cast<size_t>(h) * G + __builtin_ctz(rest)] += cnt;
                    for (int b = 0; b < topo.nodes; ++b) {
                        const uint32_t in_b = (mask >> (b * M)) & ((1u << M) - 1);
                        if (in_b == 0) continue;
                        // Home node: straight to each GPU; remote node: one copy to the peer, which forwards.
                        const int from = b == h / M ? h : b * M + h % M;
                        if (from != h) hsc[static_cast<size_t>(h) * G + from] += cnt;
                        for (uint32_t rest = in_b; rest != 0; rest &= rest - 1)
                            hsc[static_cast<size_t>(from) * G + b * M + __builtin_ctz(rest)] += cnt;
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
    GRACE_CHECK_INPUT(plan.top_k == trace.top_k, "the plan has top_k = ", plan.top_k,
                      " but the trace has top_k = ", trace.top_k);
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

namespace grace {

std::vector<int64_t> Replayer::instance_selections(int layer) const {
    const ExpertPlan& p = impl_->plan;
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    const LayerState& st = impl_->layers[layer];
    const int num_inst = st.inst_begin[p.num_experts];
    std::vector<int64_t> total(num_inst, 0);
    for (int h = 0; h < p.topology.num_gpus(); ++h)
        for (int i = 0; i < num_inst; ++i) total[i] += st.src_inst[static_cast<size_t>(h) * num_inst + i];
    return total;
}

void Replayer::set_wrr_weights(int layer, const std::vector<std::vector<int>>& weights) {
    ExpertPlan& p = impl_->plan;
    GRACE_CHECK_ARG(layer >= 0 && layer < p.num_layers, "layer ", layer, " is outside [0, ", p.num_layers, ")");
    LayerState& st = impl_->layers[layer];
    st.router->set_wrr_weights(weights);
    p.layers[layer].wrr_weights = weights;
    // The table's shape does not depend on the weights (a multi-instance tier never has a constant sequence, every
    // weight being >= 1), so the sequences are rewritten in place and their positions (the counters) kept.
    const int E = p.num_experts, G = p.topology.num_gpus();
    for (int src = 0; src < G; ++src)
        for (int e = 0; e < E; ++e) {
            const int32_t entry = st.table[static_cast<size_t>(src) * E + e];
            if (entry > -2) continue;
            const uint8_t* seq = st.router->sequence(src, e);
            const auto& gpus = st.plan->instance_gpus[e];
            int32_t* out = st.sequence_entries.data() + static_cast<size_t>(-2 - entry) * st.period;
            for (int o = 0; o < st.period; ++o) out[o] = ((st.inst_begin[e] + seq[o]) << 8) | gpus[seq[o]];
        }
}

}  // namespace grace
