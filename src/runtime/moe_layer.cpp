#include <algorithm>
#include <chrono>
#include <cstring>

#include "grace/error.hpp"
#include "grace/runtime.hpp"

namespace grace {

DispatchLayout compute_dispatch_layout(const int32_t* dest_ranks, const int32_t* topk_ids, int64_t num_tokens,
                                       int top_k, int num_experts, const Topology& topology) {
    const int G = topology.num_gpus(), N = topology.nodes;
    DispatchLayout layout;
    layout.num_tokens_per_rank.assign(G, 0);
    layout.num_tokens_per_node.assign(N, 0);
    layout.num_tokens_per_expert.assign(num_experts, 0);
    layout.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * G, 0);
    std::vector<uint8_t> in_node(N);
    for (int64_t t = 0; t < num_tokens; ++t) {
        uint8_t* in_rank = layout.is_token_in_rank.data() + t * G;
        std::fill(in_node.begin(), in_node.end(), 0);
        for (int j = 0; j < top_k; ++j) {
            const int32_t e = topk_ids[t * top_k + j];
            if (e < 0) continue;
            const int32_t d = dest_ranks[t * top_k + j];
            GRACE_CHECK_ARG(e < num_experts, "token ", t, " selection ", j, ": expert ", e, " is outside [0, ",
                            num_experts, ")");
            GRACE_CHECK_ARG(d >= 0 && d < G, "token ", t, " selection ", j, ": destination ", d, " is outside [0, ", G,
                            ")");
            ++layout.num_tokens_per_expert[e];
            if (!in_rank[d]) {
                in_rank[d] = 1;
                ++layout.num_tokens_per_rank[d];
            }
            const int n = topology.node_of(d);
            if (!in_node[n]) {
                in_node[n] = 1;
                ++layout.num_tokens_per_node[n];
            }
        }
    }
    return layout;
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// One metadata record per selection carried with a copy. Which fields go on the wire depends on the stage:
// kExpertWeight (flat, flat-dedup, HSC stage 2) or kExpertDestWeight (HSC stage 1, where the peer forwards).
enum class RecordKind { kExpertWeight, kExpertDestWeight };
int record_bytes(RecordKind kind) { return kind == RecordKind::kExpertWeight ? 8 : 12; }

struct Record {
    int32_t expert = -1;
    int32_t dest = -1;
    float weight = 0;
};

// One all-to-all exchange (a dispatch stage) and its mirror in combine. Copies are queued per target group
// rank; each copy is a payload row (H floats, from `x`) followed by `records_per_copy` metadata records.
struct Stage {
    CommGroup group = CommGroup::kGlobal;
    RecordKind kind = RecordKind::kExpertWeight;
    int records_per_copy = 1;
    int n = 0;                                 // group size
    std::vector<std::vector<const float*>> x;  // [n][copies] payload source (dispatch only)
    // [n][copies] where the returned vector is added in combine: >= 0 row t of the output, < 0 row -1 - code of
    // the node-level accumulator of the forwarded copies (HSC).
    std::vector<std::vector<int64_t>> accum;
    std::vector<std::vector<Record>> records;  // [n][copies * records_per_copy]
    std::vector<uint8_t> peers;                // [n] ranks exchanged with (counts), symmetric
    // Exchange state.
    AlltoallvLayout layout;
    std::vector<char> send, recv;
    std::vector<uint64_t> recv_copies;  // [n]
    int64_t total_recv = 0;
    std::unique_ptr<CommRequest> request;

    void reset(CommGroup g, RecordKind k, int recs, int size) {
        group = g;
        kind = k;
        records_per_copy = recs;
        n = size;
        x.assign(n, {});
        accum.assign(n, {});
        records.assign(n, {});
        peers.assign(n, 0);
    }
    size_t row_bytes(int H) const {
        return static_cast<size_t>(H) * 4 + static_cast<size_t>(records_per_copy) * record_bytes(kind);
    }
    // After dispatch only the counts and accumulators are needed: drop the buffers and payload pointers.
    void release_dispatch_buffers() {
        std::vector<char>().swap(send);
        std::vector<char>().swap(recv);
        std::vector<std::vector<const float*>>().swap(x);
        std::vector<std::vector<Record>>().swap(records);
    }
};

// Where a received row's expert output goes in combine.
enum class RowTarget : uint8_t {
    kOut,       // the caller's own token: row of the output
    kForward,   // HSC: a stage-1 copy this rank forwards: row of the node-level accumulator
    kPartial1,  // a stage-1 (flat) copy: row of the vectors sent back in stage 1
    kPartial2,  // HSC: a stage-2 copy: row of the vectors sent back in stage 2
};

}  // namespace

struct MoeHandle::State {
    const void* owner = nullptr;  // the layer's Impl
    int64_t T = 0, R = 0;
    bool hsc = false;
    Stage s1, s2;
    int64_t forwarded = 0;                                  // HSC: stage-1 copies received (forward rows)
    std::vector<std::pair<RowTarget, int64_t>> row_target;  // [R]
    std::chrono::steady_clock::time_point start;
};

MoeHandle::MoeHandle() = default;
MoeHandle::~MoeHandle() = default;
MoeHandle::MoeHandle(MoeHandle&&) noexcept = default;
MoeHandle& MoeHandle::operator=(MoeHandle&&) noexcept = default;
int64_t MoeHandle::num_tokens() const { return state_ ? state_->T : 0; }
int64_t MoeHandle::num_rows() const { return state_ ? state_->R : 0; }

void run_local_experts(const std::vector<ExpertWeightsView>& slots, int hidden, const float* x, const int32_t* topk,
                       const float* weights, int64_t rows, int top_k, float* expert_out,
                       std::vector<ExpertWorkspace>& workspaces) {
    const int H = hidden;
    const int S = static_cast<int>(slots.size());
    GRACE_CHECK_ARG(rows >= 0 && top_k >= 1 && H >= 1, "experts needs rows >= 0, top_k >= 1 and H >= 1, got ", rows,
                    ", ", top_k, " and ", H);
    for (int s = 0; s < S; ++s)
        GRACE_CHECK_ARG(slots[s].shape.hidden == H, "local expert slot ", s, " has hidden size ", slots[s].shape.hidden,
                        ", the rows have ", H);
    // Per slot, the (row, column) of its selections in row order: the order forward() always evaluated them in.
    std::vector<std::vector<std::pair<int64_t, int>>> work(S);
    for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < top_k; ++j) {
            const int32_t s = topk[r * top_k + j];
            GRACE_CHECK_ARG(s >= -1 && s < S, "recv_topk[", r, ", ", j, "] = ", s, " is outside [-1, ", S, ") (", S,
                            " local experts; -1 = none)");
            if (s >= 0) work[s].emplace_back(r, j);
        }
    std::fill(expert_out, expert_out + rows * H, 0.0f);
    workspaces.resize(S);
    std::vector<float> gather_x, gather_y;
    for (int s = 0; s < S; ++s) {
        const auto& list = work[s];
        if (list.empty()) continue;
        const int64_t n = static_cast<int64_t>(list.size());
        gather_x.resize(static_cast<size_t>(n) * H);
        gather_y.resize(static_cast<size_t>(n) * H);
        for (int64_t i = 0; i < n; ++i)
            std::memcpy(gather_x.data() + i * H, x + list[i].first * H, static_cast<size_t>(H) * 4);
        expert_forward(slots[s], gather_x.data(), n, gather_y.data(), workspaces[s]);
        for (int64_t i = 0; i < n; ++i) {
            const float w = weights[list[i].first * top_k + list[i].second];
            const float* y = gather_y.data() + i * H;
            float* acc = expert_out + list[i].first * H;
            for (int h = 0; h < H; ++h) acc[h] += w * y[h];
        }
    }
}

struct MoeLayer::Impl {
    LayerPlan layer;
    Topology topo;
    Communicator& comm;
    MoeLayerOptions options;
    ReplicaRouter router;
    bool token_origin_set = false;  // the first call's first_token is this rank's first token
    bool has_weights = true;
    std::vector<ExpertWeights> experts;
    int num_slots = 0;
    std::vector<int> slot_of_expert;  // [E] local slot or -1
    int H = 0, E = 0, G = 0, M = 0, me = 0, my_node = 0, my_local = 0;

    MoeCallStats stats;
    DispatchLayout layout;
    std::vector<int32_t> dest;
    std::vector<ExpertWorkspace> workspaces;

    void set_up(const LayerPlan& layer, const Topology& topology, const Communicator& communicator,
                const MoeLayerOptions& options);
    Impl(const LayerPlan& l, const Topology& t, Communicator& c, std::vector<ExpertWeights> local,
         const MoeLayerOptions& o)
        : layer(l),
          topo(t),
          comm(c),
          options(o),
          router(layer, topo, o.policy, o.routing_seed),
          experts(std::move(local)) {}

    int slot_of(int32_t expert) const {
        const int slot = expert >= 0 && expert < E ? slot_of_expert[expert] : -1;
        GRACE_CHECK(slot >= 0, ErrorCode::kInternal, "rank ", me, " was sent expert ", expert, " of layer ",
                    layer.layer, " which it does not hold");
        return slot;
    }

    void count_sent(std::array<LinkBytes, 2>& bytes, int global_dest, int64_t copies, int64_t payload, int64_t meta,
                    int64_t control) {
        auto& b = bytes[topo.node_of(global_dest) == my_node ? 0 : 1];
        if (&bytes == &stats.dispatch) stats.dispatch_copies_to[global_dest] += copies;
        b.copies += copies;
        b.payload += payload;
        b.metadata += meta;
        b.control += control;
    }

    // Packs the queued copies, exchanges counts with the stage's peers and starts the all-to-all.
    void start_stage(Stage& s) {
        const size_t row = s.row_bytes(H);
        std::vector<uint64_t> send_copies(s.n);
        size_t total = 0;
        for (int q = 0; q < s.n; ++q) {
            send_copies[q] = s.x[q].size();
            total += s.x[q].size();
        }
        s.send.resize(total * row);
        s.layout.send_counts.assign(s.n, 0);
        s.layout.send_displs.assign(s.n, 0);
        size_t off = 0;
        const int rb = record_bytes(s.kind);
        for (int q = 0; q < s.n; ++q) {
            s.layout.send_displs[q] = off;
            s.layout.send_counts[q] = s.x[q].size() * row;
            for (size_t m = 0; m < s.x[q].size(); ++m) {
                char* p = s.send.data() + off + m * row;
                std::memcpy(p, s.x[q][m], static_cast<size_t>(H) * 4);
                p += static_cast<size_t>(H) * 4;
                for (int r = 0; r < s.records_per_copy; ++r) {
                    const Record& rec = s.records[q][m * s.records_per_copy + r];
                    std::memcpy(p, &rec.expert, 4);
                    if (s.kind == RecordKind::kExpertDestWeight) {
                        std::memcpy(p + 4, &rec.dest, 4);
                        std::memcpy(p + 8, &rec.weight, 4);
                    } else {
                        std::memcpy(p + 4, &rec.weight, 4);
                    }
                    p += rb;
                }
            }
            off += s.layout.send_counts[q];
        }
        const int self = s.group == CommGroup::kGlobal ? me : my_local;
        GRACE_ASSERT(s.x[self].empty());
        s.recv_copies = comm.exchange_counts(s.group, send_copies, s.peers);
        s.layout.recv_counts.assign(s.n, 0);
        s.layout.recv_displs.assign(s.n, 0);
        size_t roff = 0;
        s.total_recv = 0;
        for (int q = 0; q < s.n; ++q) {
            s.layout.recv_displs[q] = roff;
            s.layout.recv_counts[q] = s.recv_copies[q] * row;
            roff += s.layout.recv_counts[q];
            s.total_recv += static_cast<int64_t>(s.recv_copies[q]);
        }
        s.recv.resize(roff);
        for (int q = 0; q < s.n; ++q) {
            if (q == self) continue;
            const int64_t c = static_cast<int64_t>(s.x[q].size());
            const int g = comm.global_rank(s.group, q);
            count_sent(stats.dispatch, g, c, c * H * 4, c * s.records_per_copy * rb, s.peers[q] ? 8 : 0);
        }
        s.request = comm.start_alltoallv(s.group, s.send.data(), s.recv.data(), s.layout);
    }

    // Visits every received copy: fn(source group rank, copy index within the stage's receive order, x, records).
    template <typename Fn>
    void for_each_received(const Stage& s, Fn&& fn) {
        const size_t row = s.row_bytes(H);
        const int rb = record_bytes(s.kind);
        std::vector<Record> recs(s.records_per_copy);
        int64_t index = 0;
        for (int q = 0; q < s.n; ++q) {
            for (uint64_t m = 0; m < s.recv_copies[q]; ++m, ++index) {
                const char* p = s.recv.data() + s.layout.recv_displs[q] + m * row;
                const float* x = reinterpret_cast<const float*>(p);
                const char* r = p + static_cast<size_t>(H) * 4;
                for (int i = 0; i < s.records_per_copy; ++i, r += rb) {
                    std::memcpy(&recs[i].expert, r, 4);
                    if (s.kind == RecordKind::kExpertDestWeight) {
                        std::memcpy(&recs[i].dest, r + 4, 4);
                        std::memcpy(&recs[i].weight, r + 8, 4);
                    } else {
                        recs[i].dest = -1;
                        std::memcpy(&recs[i].weight, r + 4, 4);
                    }
                }
                fn(q, index, x, recs);
            }
        }
    }

    // Sends back one vector per received copy (rows of `partials`, in receive order) and adds each returned
    // vector into the accumulator of the copy it answers (`out` rows, or `forward` rows for codes < 0).
    void combine_stage(Stage& s, const std::vector<float>& partials, float* out, float* forward) {
        const size_t row = static_cast<size_t>(H) * 4;
        AlltoallvLayout back;
        back.send_counts.resize(s.n);
        back.send_displs.resize(s.n);
        back.recv_counts.resize(s.n);
        back.recv_displs.resize(s.n);
        size_t soff = 0, roff = 0;
        const int self = s.group == CommGroup::kGlobal ? me : my_local;
        for (int q = 0; q < s.n; ++q) {
            back.send_displs[q] = soff;
            back.send_counts[q] = s.recv_copies[q] * row;
            soff += back.send_counts[q];
            back.recv_displs[q] = roff;
            back.recv_counts[q] = s.accum[q].size() * row;
            roff += back.recv_counts[q];
            if (q != self) {
                const int64_t c = static_cast<int64_t>(s.recv_copies[q]);
                count_sent(stats.combine, comm.global_rank(s.group, q), c, c * H * 4, 0, 0);
            }
        }
        std::vector<float> returned(roff / 4);
        comm.alltoallv(s.group, partials.data(), returned.data(), back);
        for (int q = 0; q < s.n; ++q) {
            const float* src = returned.data() + back.recv_displs[q] / 4;
            for (size_t m = 0; m < s.accum[q].size(); ++m) {
                const int64_t code = s.accum[q][m];
                float* acc = code >= 0 ? out + code * H : forward + (-1 - code) * H;
                const float* v = src + m * H;
                for (int h = 0; h < H; ++h) acc[h] += v[h];
            }
        }
    }

    MoeHandle dispatch(const float* hidden, const int32_t* ids, const float* weights, int64_t T, int k,
                       MoeReceived& received, int64_t first_token);
    void combine(const float* expert_out, MoeHandle::State& st, float* out);
    void own_slots(std::vector<ExpertWeightsView>& views) {
        GRACE_CHECK_ARG(has_weights, "layer ", layer.layer,
                        " was built without expert weights: pass them to experts() (or build it with weights)");
        views.resize(experts.size());
        workspaces.resize(experts.size());
        for (size_t s = 0; s < experts.size(); ++s) {
            const ExpertWeights& w = experts[s];
            ExpertWeightsView& v = views[s];
            v.shape = w.shape;
            if (w.storage == DType::kF32) {
                v.gate = w.gate.data();
                v.up = w.up.data();
                v.down = w.down.data();
                continue;
            }
            // bf16 storage: widen to fp32 per call (the stored copy stays bf16), as expert_forward does.
            const size_t hi = static_cast<size_t>(w.shape.hidden) * w.shape.intermediate;
            std::vector<float>& dst = workspaces[s].weights;
            dst.resize(3 * hi);
            for (size_t i = 0; i < hi; ++i) dst[i] = bf16_to_float(w.gate_bf16[i]);
            for (size_t i = 0; i < hi; ++i) dst[hi + i] = bf16_to_float(w.up_bf16[i]);
            for (size_t i = 0; i < hi; ++i) dst[2 * hi + i] = bf16_to_float(w.down_bf16[i]);
            v.gate = dst.data();
            v.up = dst.data() + hi;
            v.down = dst.data() + 2 * hi;
        }
    }
    void run_experts(const std::vector<ExpertWeightsView>& slots, const float* x, const int32_t* topk, const float* w,
                     int64_t rows, int k, float* expert_out) {
        const auto t0 = Clock::now();
        GRACE_CHECK_ARG(static_cast<int>(slots.size()) == num_slots, "experts got weights of ", slots.size(),
                        " experts, rank ", me, " holds ", num_slots, " in layer ", layer.layer);
        // Own bf16 weights live in workspaces[s].weights: keep them (run_local_experts resizes, never shrinks
        // below the slot count).
        run_local_experts(slots, H, x, topk, w, rows, k, expert_out, workspaces);
        int64_t n = 0;
        for (int64_t i = 0; i < rows * k; ++i) n += topk[i] >= 0;
        stats.expert_rows = n;
        stats.expert_s = seconds_since(t0);
    }
};

MoeHandle MoeLayer::Impl::dispatch(const float* hidden, const int32_t* ids, const float* weights, int64_t T, int k,
                                   MoeReceived& received, int64_t first_token) {
    GRACE_CHECK_ARG(T >= 0 && k >= 1, "forward needs num_tokens >= 0 and top_k >= 1, got ", T, " and ", k);
    MoeHandle handle;
    handle.state_ = std::make_unique<MoeHandle::State>();
    MoeHandle::State& st = *handle.state_;
    st.owner = this;
    st.T = T;
    st.start = Clock::now();
    stats = MoeCallStats{};
    stats.dispatch_copies_to.assign(G, 0);
    // Routing.
    auto t0 = Clock::now();
    dest.assign(static_cast<size_t>(T) * k, -1);
    if (!token_origin_set) router.set_token_origin(me, first_token), token_origin_set = true;
    for (int64_t t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
            const int32_t e = ids[t * k + j];
            if (e < 0) continue;
            GRACE_CHECK_ARG(e < E, "topk_ids[", t, ", ", j, "] = ", e, " is outside [0, ", E, ")");
            dest[t * k + j] = router.route(me, e, first_token + t, j, k);
        }
    stats.local_selections = T * k;
    stats.routing_s = seconds_since(t0);

    // Received rows, appended in the order forward() has always evaluated the local selections in.
    received = MoeReceived{};
    received.top_k = k;
    auto new_row = [&](const float* x, RowTarget target, int64_t index) {
        received.x.insert(received.x.end(), x, x + H);
        received.topk.insert(received.topk.end(), k, -1);
        received.weights.insert(received.weights.end(), k, 0.0f);
        st.row_target.emplace_back(target, index);
        return received.rows++;
    };
    auto set_selection = [&](int64_t row, int j, int32_t expert, float weight) {
        received.topk[row * k + j] = slot_of(expert);
        received.weights[row * k + j] = weight;
    };
    // The last stage's arrivals: each entry with a selection on this rank becomes one received row.
    auto receive_rows = [&](const Stage& s, RowTarget target) {
        for_each_received(s, [&](int, int64_t index, const float* x, const std::vector<Record>& recs) {
            int64_t row = -1;
            for (size_t j = 0; j < recs.size(); ++j)
                if (recs[j].expert >= 0) {
                    if (row < 0) row = new_row(x, target, index);
                    set_selection(row, static_cast<int>(j), recs[j].expert, recs[j].weight);
                }
        });
    };

    // Layout and packing.
    t0 = Clock::now();
    layout = compute_dispatch_layout(dest.data(), ids, T, k, E, topo);
    const float* x_of = hidden;
    auto token_x = [&](int64_t t) { return x_of + t * H; };

    if (options.scheme == CommScheme::kFlat || options.scheme == CommScheme::kFlatDedup) {
        const bool dedup = options.scheme == CommScheme::kFlatDedup;
        Stage& s = st.s1;
        s.reset(CommGroup::kGlobal, RecordKind::kExpertWeight, dedup ? k : 1, G);
        for (int q = 0; q < G; ++q) s.peers[q] = q != me;
        for (int q = 0; q < G; ++q)
            if (q != me && dedup) {
                s.x[q].reserve(layout.num_tokens_per_rank[q]);
                s.accum[q].reserve(layout.num_tokens_per_rank[q]);
            }
        for (int64_t t = 0; t < T; ++t) {
            const int32_t* d = dest.data() + t * k;
            int64_t own_row = -1;
            for (int j = 0; j < k; ++j) {
                if (d[j] < 0) continue;
                if (d[j] == me) {
                    if (own_row < 0) own_row = new_row(token_x(t), RowTarget::kOut, t);
                    set_selection(own_row, j, ids[t * k + j], weights[t * k + j]);
                    continue;
                }
                if (!dedup) {
                    s.x[d[j]].push_back(token_x(t));
                    s.accum[d[j]].push_back(t);
                    s.records[d[j]].push_back({ids[t * k + j], -1, weights[t * k + j]});
                    continue;
                }
                if (!first_to_gpu(d, j)) continue;
                s.x[d[j]].push_back(token_x(t));
                s.accum[d[j]].push_back(t);
                for (int i = 0; i < k; ++i)
                    s.records[d[j]].push_back(d[i] == d[j] ? Record{ids[t * k + i], -1, weights[t * k + i]} : Record{});
            }
        }
        if (dedup)
            for (int q = 0; q < G; ++q)
                GRACE_ASSERT(q == me || static_cast<int>(s.x[q].size()) == layout.num_tokens_per_rank[q]);
        stats.layout_s = seconds_since(t0);

        t0 = Clock::now();
        start_stage(s);
        s.request->wait();
        receive_rows(s, RowTarget::kPartial1);
        s.release_dispatch_buffers();
        stats.dispatch_s = seconds_since(t0);
    } else {
        st.hsc = true;
        // HSC stage 1: own tokens to the peer (same local index) of every other destination node.
        Stage& a = st.s1;
        a.reset(CommGroup::kGlobal, RecordKind::kExpertDestWeight, k, G);
        for (int b = 0; b < topo.nodes; ++b)
            if (b != my_node) a.peers[topo.gpu_at(b, my_local)] = 1;
        for (int64_t t = 0; t < T; ++t) {
            const int32_t* d = dest.data() + t * k;
            for (int j = 0; j < k; ++j) {
                if (d[j] < 0) continue;
                const int b = topo.node_of(d[j]);
                if (b == my_node) continue;
                if (!first_to_node(d, j, topo)) continue;
                const int peer = topo.gpu_at(b, my_local);
                a.x[peer].push_back(token_x(t));
                a.accum[peer].push_back(t);
                for (int i = 0; i < k; ++i)
                    a.records[peer].push_back(d[i] >= 0 && topo.node_of(d[i]) == b
                                                  ? Record{ids[t * k + i], d[i], weights[t * k + i]}
                                                  : Record{});
            }
        }
        for (int b = 0; b < topo.nodes; ++b)
            if (b != my_node)
                GRACE_ASSERT(static_cast<int>(a.x[topo.gpu_at(b, my_local)].size()) == layout.num_tokens_per_node[b]);
        stats.layout_s = seconds_since(t0);

        t0 = Clock::now();
        start_stage(a);
        double stage1_start_s = seconds_since(t0);

        // While stage 1 is in flight: the intra-node part of the own tokens (stage-2 queue and local rows).
        auto t_overlap = Clock::now();
        Stage& s = st.s2;
        s.reset(CommGroup::kNode, RecordKind::kExpertWeight, k, topo.gpus_per_node);
        for (int q = 0; q < s.n; ++q) s.peers[q] = q != my_local;
        // Queues the copies of one entry row (x, its k records restricted to this node) into stage 2; the
        // selections on this rank make one received row whose output goes to (target, index).
        auto queue_node_copies = [&](const float* x, const Record* recs, RowTarget target, int64_t index) {
            const int64_t code = target == RowTarget::kOut ? index : -1 - index;
            int64_t row = -1;
            for (int j = 0; j < k; ++j) {
                const int32_t dj = recs[j].dest;
                if (recs[j].expert < 0 || dj < 0 || topo.node_of(dj) != my_node) continue;
                if (dj == me) {
                    if (row < 0) row = new_row(x, target, index);
                    set_selection(row, j, recs[j].expert, recs[j].weight);
                    continue;
                }
                bool first = true;
                for (int i = 0; i < j; ++i) first = first && !(recs[i].expert >= 0 && recs[i].dest == dj);
                if (!first) continue;
                const int q = topo.local_index(dj);
                s.x[q].push_back(x);
                s.accum[q].push_back(code);
                for (int i = 0; i < k; ++i)
                    s.records[q].push_back(recs[i].expert >= 0 && recs[i].dest == dj
                                               ? Record{recs[i].expert, -1, recs[i].weight}
                                               : Record{});
            }
        };
        std::vector<Record> own(k);
        for (int64_t t = 0; t < T; ++t) {
            for (int j = 0; j < k; ++j) own[j] = Record{ids[t * k + j], dest[t * k + j], weights[t * k + j]};
            queue_node_copies(token_x(t), own.data(), RowTarget::kOut, t);
        }
        stats.overlap_s = seconds_since(t_overlap);
        stats.layout_s += stats.overlap_s;

        t0 = Clock::now();
        a.request->wait();
        // Forwarded copies: each received stage-1 copy gets a node-level accumulator row in combine.
        st.forwarded = a.total_recv;
        for_each_received(a, [&](int, int64_t index, const float* x, const std::vector<Record>& recs) {
            for (const Record& r : recs)
                GRACE_CHECK(r.expert < 0 || (r.dest >= 0 && topo.node_of(r.dest) == my_node), ErrorCode::kInternal,
                            "HSC stage 1 delivered a selection for GPU ", r.dest, " to rank ", me);
            queue_node_copies(x, recs.data(), RowTarget::kForward, index);
        });
        start_stage(s);
        s.request->wait();
        receive_rows(s, RowTarget::kPartial2);
        a.release_dispatch_buffers();
        s.release_dispatch_buffers();
        stats.dispatch_s = stage1_start_s + seconds_since(t0);
    }
    st.R = received.rows;
    return handle;
}

void MoeLayer::Impl::combine(const float* expert_out, MoeHandle::State& st, float* out) {
    const auto t0 = Clock::now();
    const int64_t T = st.T;
    // Every target row starts as 0 plus the expert output of at most one received row (the sum forward() built
    // in place), then the vectors sent back are added in stage order.
    std::fill(out, out + T * H, 0.0f);
    std::vector<float> forward_rows(static_cast<size_t>(st.forwarded) * H, 0.0f);
    std::vector<float> partials1(st.hsc ? 0 : static_cast<size_t>(st.s1.total_recv) * H, 0.0f);
    std::vector<float> partials2(st.hsc ? static_cast<size_t>(st.s2.total_recv) * H : 0, 0.0f);
    for (int64_t r = 0; r < st.R; ++r) {
        const auto [target, index] = st.row_target[r];
        float* dst = target == RowTarget::kOut        ? out + index * H
                     : target == RowTarget::kForward  ? forward_rows.data() + index * H
                     : target == RowTarget::kPartial1 ? partials1.data() + index * H
                                                      : partials2.data() + index * H;
        std::memcpy(dst, expert_out + r * H, static_cast<size_t>(H) * 4);
    }
    if (!st.hsc) {
        combine_stage(st.s1, partials1, out, nullptr);
    } else {
        // Combine mirrors dispatch: reduce inside the node first (stage 2 back), then one vector per
        // (token, node) back across (stage 1 back).
        combine_stage(st.s2, partials2, out, forward_rows.data());
        combine_stage(st.s1, forward_rows, out, nullptr);
    }
    stats.combine_s = seconds_since(t0);
    stats.total_s = seconds_since(st.start);
}

// What both constructors check and derive: the scheme, the communicator's shape, this rank's place, E and G.
void MoeLayer::Impl::set_up(const LayerPlan& layer, const Topology& topology, const Communicator& communicator,
                            const MoeLayerOptions& options) {
    GRACE_CHECK(options.scheme != CommScheme::k2dh, ErrorCode::kUnsupported,
                "the runtime executes flat, flat-dedup and hsc; 2dh is priced by the evaluator only");
    GRACE_CHECK_ARG(communicator.topology().nodes == topology.nodes &&
                        communicator.topology().gpus_per_node == topology.gpus_per_node,
                    "communicator topology ", communicator.topology().to_string(), " differs from the layer's ",
                    topology.to_string());
    G = topology.num_gpus();
    M = topology.gpus_per_node;
    me = communicator.rank();
    my_node = topology.node_of(me);
    my_local = topology.local_index(me);
    E = static_cast<int>(layer.primary_gpu.size());
    GRACE_CHECK_ARG(static_cast<int>(layer.gpu_experts.size()) == G, "layer ", layer.layer, " plan has ",
                    layer.gpu_experts.size(), " GPUs but the topology has ", G);
    slot_of_expert.assign(E, -1);
}

MoeLayer::MoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
                   std::vector<ExpertWeights> local_experts, const MoeLayerOptions& options)
    : impl_(std::make_unique<Impl>(layer, topology, communicator, std::move(local_experts), options)) {
    Impl& m = *impl_;
    m.set_up(layer, topology, communicator, options);
    for (size_t s = 0; s < m.experts.size(); ++s) {
        const int e = m.experts[s].expert;
        GRACE_CHECK_ARG(e >= 0 && e < m.E, "local expert ", e, " is outside [0, ", m.E, ")");
        GRACE_CHECK_ARG(m.slot_of_expert[e] < 0, "local expert ", e, " given twice");
        m.slot_of_expert[e] = static_cast<int>(s);
        if (s == 0) m.H = m.experts[0].shape.hidden;
        GRACE_CHECK_ARG(m.experts[s].shape == m.experts[0].shape, "local expert ", e,
                        " has shape H=", m.experts[s].shape.hidden, " I=", m.experts[s].shape.intermediate, ", expert ",
                        m.experts[0].expert, " has H=", m.experts[0].shape.hidden,
                        " I=", m.experts[0].shape.intermediate);
    }
    const auto& mine = layer.gpu_experts[m.me];
    for (int e : mine)
        GRACE_CHECK_ARG(e >= 0 && e < m.E && m.slot_of_expert[e] >= 0, "rank ", m.me, " holds expert ", e, " in layer ",
                        layer.layer, " of the plan but its weights were not given");
    GRACE_CHECK_ARG(mine.size() == m.experts.size(), "rank ", m.me, " was given ", m.experts.size(),
                    " experts but the plan puts ", mine.size(), " on it in layer ", layer.layer);
    m.num_slots = static_cast<int>(m.experts.size());
    // H must be known even on a rank without experts: agree on it across ranks.
    std::vector<double> h{static_cast<double>(m.H)};
    communicator.allreduce_max(h);
    GRACE_CHECK_ARG(m.H == 0 || m.H == static_cast<int>(h[0]), "rank ", m.me, " has hidden size ", m.H,
                    " but another rank has ", h[0]);
    m.H = static_cast<int>(h[0]);
    GRACE_CHECK_ARG(m.H > 0, "layer ", layer.layer, ": no rank holds any expert weights");
    m.workspaces.resize(m.experts.size());
}

MoeLayer::MoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator, int hidden_size,
                   const MoeLayerOptions& options)
    : impl_(std::make_unique<Impl>(layer, topology, communicator, std::vector<ExpertWeights>{}, options)) {
    Impl& m = *impl_;
    m.set_up(layer, topology, communicator, options);
    m.has_weights = false;
    const auto& mine = layer.gpu_experts[m.me];
    for (size_t s = 0; s < mine.size(); ++s) {
        const int e = mine[s];
        GRACE_CHECK_ARG(e >= 0 && e < m.E, "layer ", layer.layer, ": rank ", m.me, " holds expert ", e, " outside [0, ",
                        m.E, ")");
        GRACE_CHECK_ARG(m.slot_of_expert[e] < 0, "layer ", layer.layer, ": expert ", e, " listed twice on rank ", m.me);
        m.slot_of_expert[e] = static_cast<int>(s);
    }
    m.num_slots = static_cast<int>(mine.size());
    GRACE_CHECK_ARG(hidden_size >= 1, "hidden size must be >= 1, got ", hidden_size);
    std::vector<double> h{static_cast<double>(hidden_size), -static_cast<double>(hidden_size)};
    communicator.allreduce_max(h);
    GRACE_CHECK_ARG(h[0] == hidden_size && -h[1] == hidden_size, "rank ", m.me, " has hidden size ", hidden_size,
                    " but the ranks' sizes range over [", -h[1], ", ", h[0], "]");
    m.H = hidden_size;
}

int64_t forward_num_tokens(size_t hidden_values, size_t topk_ids, size_t topk_weights, int top_k, int hidden_size) {
    GRACE_CHECK_ARG(top_k >= 1, "top_k must be >= 1, got ", top_k);
    const int64_t T = static_cast<int64_t>(topk_ids) / top_k;
    GRACE_CHECK_ARG(static_cast<int64_t>(topk_ids) == T * top_k && topk_weights == topk_ids, "topk_ids has ", topk_ids,
                    " and topk_weights ", topk_weights, " entries; both must be num_tokens * top_k");
    GRACE_CHECK_ARG(static_cast<int64_t>(hidden_values) == T * hidden_size, "hidden has ", hidden_values,
                    " values, expected num_tokens * H = ", T, " * ", hidden_size);
    return T;
}

MoeLayer::~MoeLayer() = default;

void MoeLayer::forward(const float* hidden, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                       int top_k, float* out, int64_t first_token) {
    GRACE_CHECK_ARG(impl_->has_weights, "layer ", impl_->layer.layer,
                    " was built without expert weights: forward() needs them (use dispatch/experts/combine)");
    MoeReceived received;
    MoeHandle handle = dispatch(hidden, topk_ids, topk_weights, num_tokens, top_k, received, first_token);
    std::vector<float> expert_out(static_cast<size_t>(received.rows) * impl_->H);
    experts(received, expert_out.data());
    combine(expert_out.data(), handle, out);
}

std::vector<float> MoeLayer::forward(const std::vector<float>& hidden, const std::vector<int32_t>& topk_ids,
                                     const std::vector<float>& topk_weights, int top_k, int64_t first_token) {
    const int64_t T = forward_num_tokens(hidden.size(), topk_ids.size(), topk_weights.size(), top_k, impl_->H);
    std::vector<float> out(static_cast<size_t>(T) * impl_->H);
    forward(hidden.data(), topk_ids.data(), topk_weights.data(), T, top_k, out.data(), first_token);
    return out;
}

MoeHandle MoeLayer::dispatch(const float* hidden, const int32_t* topk_ids, const float* topk_weights,
                             int64_t num_tokens, int top_k, MoeReceived& received, int64_t first_token) {
    return impl_->dispatch(hidden, topk_ids, topk_weights, num_tokens, top_k, received, first_token);
}

void MoeLayer::experts(const MoeReceived& received, float* expert_out) {
    std::vector<ExpertWeightsView> views;
    impl_->own_slots(views);
    impl_->run_experts(views, received.x.data(), received.topk.data(), received.weights.data(), received.rows,
                       received.top_k, expert_out);
}

void MoeLayer::experts(const std::vector<ExpertWeightsView>& slots, const float* recv_x, const int32_t* recv_topk,
                       const float* recv_weights, int64_t rows, int top_k, float* expert_out) {
    impl_->run_experts(slots, recv_x, recv_topk, recv_weights, rows, top_k, expert_out);
}

void MoeLayer::combine(const float* expert_out, MoeHandle& handle, float* out) {
    GRACE_CHECK_ARG(handle.state_ != nullptr, "combine needs the handle of a dispatch; this one was already combined");
    GRACE_CHECK_ARG(handle.state_->owner == impl_.get(), "combine was given the handle of another layer's dispatch");
    std::unique_ptr<MoeHandle::State> state = std::move(handle.state_);
    impl_->combine(expert_out, *state, out);
}

int MoeLayer::num_local_experts() const { return impl_->num_slots; }
const MoeCallStats& MoeLayer::last_stats() const { return impl_->stats; }
const DispatchLayout& MoeLayer::last_layout() const { return impl_->layout; }
const std::vector<int32_t>& MoeLayer::last_dest_ranks() const { return impl_->dest; }
ReplicaRouter& MoeLayer::router() { return impl_->router; }
int MoeLayer::hidden() const { return impl_->H; }

void check_same_plan(Communicator& communicator, const ExpertPlan& plan) {
    const auto hashes = communicator.allgather(plan_hash(plan));
    std::string differ;
    for (size_t r = 1; r < hashes.size(); ++r)
        if (hashes[r] != hashes[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    GRACE_CHECK_INPUT(differ.empty(), "ranks hold different plans: plan_hash of rank(s) ", differ,
                      " differs from rank 0's (", std::hex, hashes[0], std::dec, ")");
}

}  // namespace grace
