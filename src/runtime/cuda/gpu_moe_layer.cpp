// The expert-parallel MoE layer on GPUs (see include/grace/cuda_layer.hpp): device routing, host-planned
// dispatch layout, payload gather / metadata split / combine reduction on the device, exchanges through the
// Communicator interface, LocalMoe for the experts.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "grace/cuda_layer.hpp"
#include "grace/error.hpp"
#include "grace/routing.hpp"
#include "layer_kernels.hpp"

namespace grace::cuda {
namespace {

using bf16 = uint16_t;  // bf16 bits; the kernels see __nv_bfloat16
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// One exchange stage on the host side: per target group rank q, the copies queued for it.
struct Stage {
    CommGroup group = CommGroup::kGlobal;
    int n = 0;                               // group size
    int self = 0;                            // caller's group rank
    int recs = 1;                            // metadata records per copy
    int rec_ints = 2;                        // int32 words per record
    std::vector<std::vector<int32_t>> src;   // [n][copies] gather index (>= 0 own hidden row, < 0 stage-1 row)
    std::vector<std::vector<int32_t>> acc;   // [n][copies] accumulator row the returned vector adds into
    std::vector<std::vector<int32_t>> meta;  // [n][copies * recs * rec_ints]
    std::vector<uint64_t> send_copies, recv_copies;
    int64_t total_send = 0, total_recv = 0;
    std::unique_ptr<CommRequest> payload_req, meta_req;  // in flight between start and finish

    // Completes the exchanges: on the host (stream == nullptr and !on_stream), else for work queued on `stream`.
    void finish(bool on_stream = false, cudaStream_t stream = nullptr) {
        for (auto* r : {&payload_req, &meta_req}) {
            if (!*r) continue;
            if (on_stream)
                (*r)->wait_on_stream(stream);
            else
                (*r)->wait();
            r->reset();
        }
    }

    void reset(CommGroup g, int size, int me, int records, int ints) {
        group = g, n = size, self = me, recs = records, rec_ints = ints;
        src.assign(n, {});
        acc.assign(n, {});
        meta.assign(n, {});
    }
    size_t meta_row_bytes() const { return static_cast<size_t>(recs) * rec_ints * 4; }
};

AlltoallvLayout make_layout(const std::vector<uint64_t>& send, const std::vector<uint64_t>& recv, size_t row) {
    AlltoallvLayout l;
    const size_t n = send.size();
    l.send_counts.resize(n), l.send_displs.resize(n), l.recv_counts.resize(n), l.recv_displs.resize(n);
    size_t so = 0, ro = 0;
    for (size_t q = 0; q < n; ++q) {
        l.send_displs[q] = so, l.send_counts[q] = send[q] * row, so += l.send_counts[q];
        l.recv_displs[q] = ro, l.recv_counts[q] = recv[q] * row, ro += l.recv_counts[q];
    }
    return l;
}

// Page-locked staging for the host-to-device uploads of the stream-ordered calls (a copy from pageable memory
// would synchronize the stream first). take() hands out regions until reset(); reset() may be called only once no
// copy from the arena is pending (the layer waits on an event recorded after its last upload).
class PinnedArena {
  public:
    PinnedArena() = default;
    PinnedArena(const PinnedArena&) = delete;
    PinnedArena& operator=(const PinnedArena&) = delete;
    ~PinnedArena() {
        for (auto& b : blocks_) cudaFreeHost(b.ptr);
    }
    void* take(size_t bytes) {
        bytes = (bytes + 255) / 256 * 256;
        if (blocks_.empty() || blocks_.back().used + bytes > blocks_.back().size) {
            Block b;
            b.size = std::max<size_t>(bytes, blocks_.empty() ? size_t{1} << 20 : 2 * blocks_.back().size);
            CUDA_RUNTIME_CHECK(cudaMallocHost(&b.ptr, b.size));
            blocks_.push_back(b);
        }
        Block& b = blocks_.back();
        void* p = static_cast<char*>(b.ptr) + b.used;
        b.used += bytes;
        return p;
    }
    // Keeps one block, as large as all of the last call's together, so that the next call needs no allocation.
    void reset() {
        if (blocks_.size() > 1) {
            size_t total = 0;
            for (auto& b : blocks_) total += b.size, cudaFreeHost(b.ptr);
            blocks_.clear();
            Block b;
            b.size = total;
            CUDA_RUNTIME_CHECK(cudaMallocHost(&b.ptr, b.size));
            blocks_.push_back(b);
        }
        for (auto& b : blocks_) b.used = 0;
    }

  private:
    struct Block {
        void* ptr = nullptr;
        size_t size = 0, used = 0;
    };
    std::vector<Block> blocks_;
};

// Blocks the host until the work queued so far on `stream` is done, polling an event; throws kBackend after
// `timeout_s` (> 0) seconds naming `what` (an exchange of an earlier call that a peer never joined would
// otherwise stall here forever).
// Waits for `event` (already recorded), polling, up to timeout_s (0 = no limit).
void event_wait(cudaEvent_t event, double timeout_s, int rank, const char* what) {
    const auto t0 = Clock::now();
    for (uint64_t polls = 1;; ++polls) {
        const cudaError_t err = cudaEventQuery(event);
        if (err == cudaSuccess) return;
        if (err != cudaErrorNotReady) CUDA_RUNTIME_CHECK(err);
        if ((polls & 255) != 0) continue;
        const double waited = seconds_since(t0);
        GRACE_CHECK(timeout_s <= 0 || waited < timeout_s, ErrorCode::kBackend, "GpuMoeLayer on rank ", rank,
                    ": timed out after ", timeout_s, " s waiting for the stream (", what,
                    "); an exchange with a peer did not finish");
        if (waited > 0.1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

void host_wait(cudaStream_t stream, cudaEvent_t event, double timeout_s, int rank, const char* what) {
    CUDA_RUNTIME_CHECK(cudaEventRecord(event, stream));
    event_wait(event, timeout_s, rank, what);
}

// The device buffers of one exchange stage.
struct DevStage {
    DeviceBuffer<int32_t> idx, meta_send, meta_recv, ptr, list;
    DeviceBuffer<bf16> payload_send, payload_recv, back_send, back_recv;
    size_t bytes() const {
        return idx.bytes() + meta_send.bytes() + meta_recv.bytes() + ptr.bytes() + list.bytes() + payload_send.bytes() +
               payload_recv.bytes() + back_send.bytes() + back_recv.bytes();
    }
};

}  // namespace

// The scratch of the calls (grow only; contents matter only within one call / one dispatch..combine).
struct GpuWorkspace::Impl {
    DeviceBuffer<bf16> d_hidden;
    DeviceBuffer<int32_t> d_ids;
    DeviceBuffer<int32_t> r_inst, r_rank, r_tpr, r_tpi;
    DeviceBuffer<bool> r_in_rank;
    DevStage ds1, ds2;
    DeviceBuffer<int32_t> loc_slot;
    DeviceBuffer<float> loc_w, acc;
    DeviceBuffer<bf16> acc_bf16;
    // LocalMoe's workspace, for the shape it was built for (rebuilt when a layer of another shape uses it).
    std::unique_ptr<LocalMoe> local_moe;
    int local_moe_cap = 0, local_moe_k = 0;
    LocalMoeShape local_moe_shape{};
    GroupedGemmBackend local_moe_gemm = GroupedGemmBackend::kAuto;
    // Sequential sharing: the layer whose call is open, and its name for the error of another layer.
    const void* owner = nullptr;
    std::string owner_name;
    int device = -1;                 // the device of the first layer that used it
    cudaEvent_t released = nullptr;  // recorded on the last owner's stream when it released the workspace
    bool release_recorded = false;
    // A CUDA graph captured a call on loc_slot / local_moe: when they must grow (or local_moe is rebuilt for
    // another shape) the old ones are kept here, alive for graphs that may still replay, instead of freed.
    bool slots_in_graph = false, moe_in_graph = false;
    std::vector<DeviceBuffer<int32_t>> retired_slots;
    std::vector<std::unique_ptr<LocalMoe>> retired_moes;

    Impl() = default;  // no CUDA work here: the event is made on the first owner's device
    ~Impl() {
        local_moe.reset();
        retired_moes.clear();
        if (released) cudaEventDestroy(released);
    }
    Impl(const Impl&) = delete;
    Impl& operator=(const Impl&) = delete;
};

GpuWorkspace::GpuWorkspace() : impl_(std::make_unique<Impl>()) {}
GpuWorkspace::~GpuWorkspace() = default;
bool GpuWorkspace::in_use() const { return impl_->owner != nullptr; }
size_t GpuWorkspace::buffer_bytes() const {
    const Impl& w = *impl_;
    return w.d_hidden.bytes() + w.d_ids.bytes() + w.r_inst.bytes() + w.r_rank.bytes() + w.r_tpr.bytes() +
           w.r_tpi.bytes() + w.r_in_rank.bytes() + w.ds1.bytes() + w.ds2.bytes() + w.loc_slot.bytes() +
           w.loc_w.bytes() + w.acc.bytes() + w.acc_bf16.bytes();
}

struct GpuMoeLayer::Impl {
    LayerPlan layer;
    Topology topo;
    Communicator& comm;
    GpuMoeLayerOptions options;
    ReplicaRouter host_router;
    bool token_origin_set = false;  // the first call's first_token is this rank's first token
    std::unique_ptr<GpuReplicaRouter> gpu_router;
    int H = 0, I = 0, E = 0, G = 0, me = 0, my_node = 0, my_local = 0, n_local = 0;
    std::vector<int32_t> slot_of;  // [G * E]: position of expert e in gpu_experts[g], or -1
    DeviceBuffer<bf16> w13, w2;
    const void* w13_ptr = nullptr;  // the weights in use: w13/w2 above, or the caller's (set_expert_weights)
    const void* w2_ptr = nullptr;
    bool last_on_device = false;

    // Stream mode (the phase calls): work is queued on `stream`, exchanges complete on it, uploads are staged in
    // pinned memory. Synchronous mode (forward, forward_device): the legacy stream and host waits, as before.
    bool async = false;
    cudaStream_t stream = nullptr;
    PinnedArena staging;
    cudaEvent_t staging_free = nullptr;  // recorded after the last upload of a call
    cudaEvent_t wait_event = nullptr;    // host_wait
    int32_t* h_route = nullptr;          // pinned [3 * T * k]: ids, weights, destinations
    const int64_t* ids64 = nullptr;      // the caller's int64 ids of the open dispatch (error messages)
    size_t h_route_size = 0;
    // The open dispatch (between dispatch_phase and combine_phase).
    uint64_t calls = 0, open_call = 0;
    Stage* last_stage = nullptr;
    int64_t call_T = 0, acc_rows = 0;
    int call_k = 0;
    bool experts_ran = false;
    const bf16* expert_partials = nullptr;
    Clock::time_point t_start, t0;

    // One GPU's whole layer (forward_local): the slot of every expert on the device, the first bad id's index
    // and the slots of the last call on their way to the host (last_dest_ranks builds `dest` from them on demand).
    DeviceBuffer<int32_t> d_slot_of, d_first_bad;
    int32_t* h_local = nullptr;  // pinned [1 + T * k]: first bad index, then the slots
    size_t h_local_size = 0;
    cudaEvent_t ids_checked = nullptr, slots_copied = nullptr;
    bool counting = false;       // set_instance_counting: the device router must see every call
    bool dest_pending = false;   // dest is still to be built from h_local (the last call was forward_local)
    bool host_id_check = true;   // forward_local waits on the host for the ids' range check (set_host_id_check)
    bool capturing = false;      // the open call is being captured in a CUDA graph (forward_local only)
    bool dest_captured = false;  // the last call was captured: its destinations never reach the host
    int64_t dest_pending_n = 0;

    MoeCallStats stats;
    std::vector<int32_t> dest;
    std::vector<int32_t> h_ids;
    std::vector<float> h_w;
    Stage s1, s2;
    // Device scratch (grow only): the workspace's, shared or this layer's own; the members below name its
    // buffers.
    std::shared_ptr<GpuWorkspace> workspace;
    GpuWorkspace::Impl& ws;
    DeviceBuffer<bf16>& d_hidden;
    DeviceBuffer<int32_t>& d_ids;
    DeviceBuffer<int32_t>&r_inst, &r_rank, &r_tpr, &r_tpi;
    DeviceBuffer<bool>& r_in_rank;
    DevStage &ds1, &ds2;
    DevStage* last_dev = nullptr;
    DeviceBuffer<int32_t>& loc_slot;
    DeviceBuffer<float>&loc_w, &acc;
    DeviceBuffer<bf16>& acc_bf16;
    std::unique_ptr<LocalMoe>& local_moe;
    int &local_moe_cap, &local_moe_k;

    Impl(const LayerPlan& l, const Topology& t, Communicator& c, const GpuMoeLayerOptions& o)
        : layer(l),
          topo(t),
          comm(c),
          options(o),
          host_router(layer, topo, o.policy, o.routing_seed),
          workspace(o.workspace ? o.workspace : std::make_shared<GpuWorkspace>()),
          ws(*workspace->impl_),
          d_hidden(ws.d_hidden),
          d_ids(ws.d_ids),
          r_inst(ws.r_inst),
          r_rank(ws.r_rank),
          r_tpr(ws.r_tpr),
          r_tpi(ws.r_tpi),
          r_in_rank(ws.r_in_rank),
          ds1(ws.ds1),
          ds2(ws.ds2),
          loc_slot(ws.loc_slot),
          loc_w(ws.loc_w),
          acc(ws.acc),
          acc_bf16(ws.acc_bf16),
          local_moe(ws.local_moe),
          local_moe_cap(ws.local_moe_cap),
          local_moe_k(ws.local_moe_k) {
        options.workspace.reset();  // held once, in `workspace`
        CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&staging_free, cudaEventDisableTiming));
        CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&wait_event, cudaEventDisableTiming));
        CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&ids_checked, cudaEventDisableTiming));
        CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&slots_copied, cudaEventDisableTiming));
    }
    ~Impl() {
        release();  // a dispatch never combined: the workspace is free again (after its queued work)
        if (h_route) cudaFreeHost(h_route);
        if (h_local) cudaFreeHost(h_local);
        if (ids_checked) cudaEventDestroy(ids_checked);
        if (slots_copied) cudaEventDestroy(slots_copied);
        if (staging_free) cudaEventDestroy(staging_free);
        if (wait_event) cudaEventDestroy(wait_event);
    }

    // Host vector -> device: a plain copy in synchronous mode, else through the pinned arena on the stream.
    void upload(void* dst, const std::vector<int32_t>& src) {
        if (src.empty()) return;
        const size_t bytes = src.size() * 4;
        if (!async) {
            CUDA_RUNTIME_CHECK(cudaMemcpy(dst, src.data(), bytes, cudaMemcpyHostToDevice));
            return;
        }
        void* h = staging.take(bytes);
        std::memcpy(h, src.data(), bytes);
        CUDA_RUNTIME_CHECK(cudaMemcpyAsync(dst, h, bytes, cudaMemcpyHostToDevice, stream));
    }
    void finish(Stage& s) { s.finish(async, stream); }
    // The alltoallv of combine: blocking in synchronous mode, stream-ordered otherwise.
    void exchange(CommGroup group, const void* send, void* recv, const AlltoallvLayout& layout) {
        auto req = comm.start_alltoallv(group, send, recv, layout);
        if (async)
            req->wait_on_stream(stream);
        else
            req->wait();
    }

    int slot(int gpu, int expert) const { return slot_of[static_cast<size_t>(gpu) * E + expert]; }

    void count_sent(std::array<LinkBytes, 2>& bytes, int global_dest, int64_t copies, int64_t payload, int64_t meta,
                    int64_t control) {
        auto& b = bytes[topo.node_of(global_dest) == my_node ? 0 : 1];
        b.copies += copies, b.payload += payload, b.metadata += meta, b.control += control;
    }

    // Gathers the stage's payload rows and starts the payload and metadata exchanges (s.finish() completes them).
    void dispatch_stage(Stage& s, DevStage& d, const bf16* src0, const bf16* src1) {
        s.send_copies.assign(s.n, 0);
        s.total_send = 0;
        for (int q = 0; q < s.n; ++q) s.send_copies[q] = s.src[q].size(), s.total_send += s.src[q].size();
        std::vector<int32_t> idx, meta;
        idx.reserve(s.total_send);
        meta.reserve(s.total_send * s.recs * s.rec_ints);
        for (int q = 0; q < s.n; ++q) {
            idx.insert(idx.end(), s.src[q].begin(), s.src[q].end());
            meta.insert(meta.end(), s.meta[q].begin(), s.meta[q].end());
        }
        std::vector<uint8_t> peers(s.n, 1);
        peers[s.self] = 0;
        if (s.group == CommGroup::kGlobal && options.scheme == CommScheme::kHsc) {
            std::fill(peers.begin(), peers.end(), 0);
            for (int b = 0; b < topo.nodes; ++b)
                if (b != my_node) peers[topo.gpu_at(b, my_local)] = 1;
        }
        s.recv_copies = comm.exchange_counts(s.group, s.send_copies, peers);
        s.recv_copies[s.self] = s.send_copies[s.self];
        s.total_recv = 0;
        for (int q = 0; q < s.n; ++q) s.total_recv += static_cast<int64_t>(s.recv_copies[q]);
        const size_t prow = static_cast<size_t>(H) * 2, mrow = s.meta_row_bytes();
        for (int q = 0; q < s.n; ++q) {
            if (q == s.self) continue;
            const int64_t c = static_cast<int64_t>(s.send_copies[q]);
            count_sent(stats.dispatch, comm.global_rank(s.group, q), c, c * static_cast<int64_t>(prow),
                       c * static_cast<int64_t>(mrow), peers[q] ? 8 : 0);
        }
        d.idx.reserve(std::max<int64_t>(1, s.total_send));
        d.payload_send.reserve(std::max<int64_t>(1, s.total_send) * H);
        d.meta_send.reserve(std::max<size_t>(1, meta.size()));
        d.payload_recv.reserve(std::max<int64_t>(1, s.total_recv) * H);
        d.meta_recv.reserve(std::max<int64_t>(1, s.total_recv) * s.recs * s.rec_ints);
        if (s.total_send > 0) {
            upload(d.idx.data(), idx);
            upload(d.meta_send.data(), meta);
            detail::gather_rows(src0, src1, d.idx.data(), s.total_send, H, d.payload_send.data(), stream);
        }
        s.payload_req = comm.start_alltoallv(s.group, d.payload_send.data(), d.payload_recv.data(),
                                             make_layout(s.send_copies, s.recv_copies, prow));
        s.meta_req = comm.start_alltoallv(s.group, d.meta_send.data(), d.meta_recv.data(),
                                          make_layout(s.send_copies, s.recv_copies, mrow));
    }

    // Sends one bf16 vector back per received copy (`partials`, receive order) and adds each returned vector
    // into acc (fp32) at the row its copy named.
    void combine_stage(Stage& s, DevStage& d, const bf16* partials) {
        const size_t prow = static_cast<size_t>(H) * 2;
        for (int q = 0; q < s.n; ++q)
            if (q != s.self) {
                const int64_t c = static_cast<int64_t>(s.recv_copies[q]);
                count_sent(stats.combine, comm.global_rank(s.group, q), c, c * static_cast<int64_t>(prow), 0, 0);
            }
        d.back_recv.reserve(std::max<int64_t>(1, s.total_send) * H);
        exchange(s.group, partials, d.back_recv.data(), make_layout(s.recv_copies, s.send_copies, prow));
        if (s.total_send == 0) return;
        // Target-major lists: returned row i (send order) adds into acc row s.acc[q][m].
        int64_t targets = 0;
        for (int q = 0; q < s.n; ++q)
            for (int32_t a : s.acc[q]) targets = std::max<int64_t>(targets, a + 1);
        std::vector<int32_t> ptr(targets + 1, 0), list(s.total_send);
        for (int q = 0; q < s.n; ++q)
            for (int32_t a : s.acc[q]) ++ptr[a + 1];
        for (int64_t t = 0; t < targets; ++t) ptr[t + 1] += ptr[t];
        std::vector<int32_t> fill(ptr.begin(), ptr.end() - 1);
        int32_t i = 0;
        for (int q = 0; q < s.n; ++q)
            for (int32_t a : s.acc[q]) list[fill[a]++] = i++;
        d.ptr.reserve(targets + 1);
        d.list.reserve(list.size());
        upload(d.ptr.data(), ptr);
        upload(d.list.data(), list);
        detail::combine_reduce(d.back_recv.data(), d.ptr.data(), d.list.data(), targets, H, acc.data(), stream);
    }

    // The experts on the rows received by the last stage `s` (records {slot, weight}); partials in receive order.
    const bf16* run_experts(Stage& s, DevStage& d) {
        const int64_t R = s.total_recv;
        if (R == 0) return d.payload_recv.data();
        GRACE_CHECK(n_local > 0, ErrorCode::kInternal, "rank ", me, " received ", R, " copies but holds no experts");
        LocalMoe& moe = local_moe_for(s.recs, R);
        const int64_t n = R * s.recs;
        reserve_slots(n);
        loc_w.reserve(n);
        detail::split_meta(d.meta_recv.data(), n, loc_slot.data(), loc_w.data(), stream);
        d.back_send.reserve(R * H);
        moe.forward(d.payload_recv.data(), loc_slot.data(), loc_w.data(), d.back_send.data(), static_cast<int>(R),
                    stream);
        // The per-expert counts reach the host only after the GEMMs: read them in synchronous mode alone.
        if (!async)
            for (int32_t c : moe.last_counts()) stats.expert_rows += c;
        return d.back_send.data();
    }

    // The workspace's LocalMoe over this rank's slots with `recs` selections a row, for at least `rows` rows, with
    // this layer's weights. Built for this layer's shape (a shared workspace may hold another layer's), grown when
    // rows exceed it.
    LocalMoe& local_moe_for(int recs, int64_t rows) {
        const int64_t R = rows;
        const LocalMoeShape shape{n_local, recs, H, I};
        const bool same_shape = local_moe_has_shape(recs);
        if (!same_shape || R > local_moe_cap) {
            const int64_t grown = same_shape ? 2 * static_cast<int64_t>(local_moe_cap) : 0;
            local_moe_cap = static_cast<int>(std::max<int64_t>(R, grown));
            local_moe_k = recs;
            if (ws.moe_in_graph && local_moe) ws.retired_moes.push_back(std::move(local_moe));
            ws.moe_in_graph = false;
            local_moe.reset();
            local_moe = std::make_unique<LocalMoe>(shape, local_moe_cap, options.gemm);
            ws.local_moe_shape = shape;
            ws.local_moe_gemm = options.gemm;
        }
        GRACE_CHECK_ARG(w13_ptr && w2_ptr, "GpuMoeLayer on rank ", me, ": no expert weights (set_expert_weights)");
        local_moe->set_weights(w13_ptr, w2_ptr);
        return *local_moe;
    }
    // The workspace's LocalMoe exists for this layer's shape with `recs` selections a row.
    bool local_moe_has_shape(int recs) const {
        return local_moe && ws.local_moe_shape.num_experts == n_local && ws.local_moe_shape.top_k == recs &&
               ws.local_moe_shape.hidden == H && ws.local_moe_shape.intermediate == I &&
               ws.local_moe_gemm == options.gemm;
    }
    // Grows the workspace's slot buffer to n (a buffer a graph captured stays alive in the workspace).
    void reserve_slots(int64_t n) {
        if (static_cast<size_t>(n) <= loc_slot.size()) return;
        if (ws.slots_in_graph) ws.retired_slots.push_back(std::move(loc_slot));
        ws.slots_in_graph = false;
        loc_slot.reserve(static_cast<size_t>(n));
    }

    void route(const int32_t* d_topk, int64_t T, int k, int64_t first_token) {
        dest.assign(static_cast<size_t>(T) * k, -1);
        last_on_device = static_cast<bool>(gpu_router);
        if (T == 0) return;
        if (gpu_router) {
            r_inst.reserve(T * k), r_rank.reserve(T * k), r_in_rank.reserve(T * G);
            r_tpr.reserve(G), r_tpi.reserve(gpu_router->num_instances());
            gpu_router->route(me, d_topk, static_cast<int>(T), k,
                              RouteOutputs{r_inst.data(), r_rank.data(), r_tpr.data(), r_in_rank.data(), r_tpi.data()},
                              nullptr);
            CUDA_RUNTIME_CHECK(cudaMemcpy(dest.data(), r_rank.data(), dest.size() * 4, cudaMemcpyDeviceToHost));
            return;
        }
        if (!token_origin_set) host_router.set_token_origin(me, first_token), token_origin_set = true;
        for (int64_t t = 0; t < T; ++t)
            for (int j = 0; j < k; ++j) {
                const int32_t e = h_ids[t * k + j];
                if (e >= 0) dest[t * k + j] = host_router.route(me, e, first_token + t, j, k);
            }
    }

    // Stream mode routing: the GPU router reads the caller's ids; ids, weights and destinations come to the host
    // in one copy and one wait (the layout below is planned on the host).
    void route_async(const int32_t* d_topk, const float* d_weights, int64_t T, int k, int64_t first_token) {
        const size_t n = static_cast<size_t>(T) * k;
        dest.assign(n, -1);
        h_ids.resize(n);
        h_w.resize(n);
        last_on_device = static_cast<bool>(gpu_router);
        if (T == 0) return;
        if (h_route_size < 3 * n) {
            if (h_route) cudaFreeHost(h_route);
            h_route = nullptr, h_route_size = 0;
            CUDA_RUNTIME_CHECK(cudaMallocHost(&h_route, 3 * n * 4));
            h_route_size = 3 * n;
        }
        if (gpu_router) {
            r_inst.reserve(T * k), r_rank.reserve(T * k), r_in_rank.reserve(T * G);
            r_tpr.reserve(G), r_tpi.reserve(gpu_router->num_instances());
            gpu_router->route(me, d_topk, static_cast<int>(T), k,
                              RouteOutputs{r_inst.data(), r_rank.data(), r_tpr.data(), r_in_rank.data(), r_tpi.data()},
                              stream);
            CUDA_RUNTIME_CHECK(cudaMemcpyAsync(h_route + 2 * n, r_rank.data(), n * 4, cudaMemcpyDeviceToHost, stream));
        }
        CUDA_RUNTIME_CHECK(cudaMemcpyAsync(h_route, d_topk, n * 4, cudaMemcpyDeviceToHost, stream));
        CUDA_RUNTIME_CHECK(cudaMemcpyAsync(h_route + n, d_weights, n * 4, cudaMemcpyDeviceToHost, stream));
        host_wait(stream, wait_event, comm.timeout_s(), me, "routing destinations to the host");
        std::memcpy(h_ids.data(), h_route, n * 4);
        std::memcpy(h_w.data(), h_route + n, n * 4);
        if (gpu_router) std::memcpy(dest.data(), h_route + 2 * n, n * 4);
        // The device router skipped ids outside [0, E) (as masked); the call is refused here.
        for (size_t i = 0; i < n; ++i) {
            if (h_ids[i] < E) continue;
            int64_t v = h_ids[i];  // int64 ids were clamped to E by narrow_ids: name the caller's value
            if (ids64 && cudaMemcpy(&v, ids64 + i, sizeof v, cudaMemcpyDeviceToHost) != cudaSuccess) v = h_ids[i];
            GRACE_CHECK_ARG(false, "topk_ids[", i / k, ", ", i % k, "] = ", v, " is outside [0, ", E, ")");
        }
        if (gpu_router) return;
        if (!token_origin_set) host_router.set_token_origin(me, first_token), token_origin_set = true;
        for (int64_t t = 0; t < T; ++t)
            for (int j = 0; j < k; ++j) {
                const int32_t e = h_ids[t * k + j];
                if (e >= 0) dest[t * k + j] = host_router.route(me, e, first_token + t, j, k);
            }
    }

    std::string name() const { return "layer " + std::to_string(layer.layer) + " on rank " + std::to_string(me); }
    // Takes the workspace for one call (or one dispatch..combine); throws while another layer holds it.
    void acquire(cudaStream_t s) {
        // A captured call is ordered by its stream alone: a graph cannot wait on an event recorded outside it.
        stream = s;                    // where release() records the end of this layer's use
        if (ws.owner == this) return;  // this layer's own open dispatch, which the new call replaces
        GRACE_CHECK_ARG(ws.owner == nullptr, "GpuMoeLayer ", name(), ": its shared GpuWorkspace is in use by ",
                        ws.owner_name, " (a dispatch not yet combined); combine that handle before calling ",
                        "another layer that shares the workspace");
        int device = 0;
        CUDA_RUNTIME_CHECK(cudaGetDevice(&device));
        GRACE_CHECK_ARG(ws.device < 0 || ws.device == device, "GpuMoeLayer ", name(), " runs on CUDA device ", device,
                        " but its shared GpuWorkspace belongs to device ", ws.device);
        if (!ws.released) CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&ws.released, cudaEventDisableTiming));
        // The previous owner's last use (on its stream) before this call's.
        if (ws.release_recorded && !capturing) CUDA_RUNTIME_CHECK(cudaStreamWaitEvent(s, ws.released, 0));
        ws.device = device;
        ws.owner = this;
        ws.owner_name = name();
    }
    // Gives the workspace back at the end of a call (or a failed one); never throws.
    void release() noexcept {
        if (ws.owner != this) return;
        if (!capturing) {  // an event recorded in a capture could not be waited on by a later uncaptured call
            ws.release_recorded = cudaEventRecord(ws.released, stream) == cudaSuccess;
            if (!ws.release_recorded) cudaGetLastError();
        }
        ws.owner = nullptr;
    }
    // Closes the open call (after combine, or after a failure).
    void close_call() noexcept {
        open_call = 0;
        release();
    }

    // Sets the mode for one call and opens it (call it inside the try whose catch calls close_call()).
    // `host_free`: the call writes no host staging (forward_local without the host id check), so the previous
    // call's staging copies need only be ordered before this call's on the device, not waited for.
    // `not_capturable`: why the call cannot run in a CUDA graph capture (nullptr: it can; forward_local only).
    static constexpr const char* kHostLayout =
        "the dispatch layout is planned on the host from the routing destinations (a device-to-host copy and a "
        "host wait per call)";
    void begin_call(bool stream_mode, cudaStream_t s, bool host_free = false,
                    const char* not_capturable = kHostLayout) {
        capturing = false;
        if (stream_mode && s) {
            // Refused before anything is queued, so that the caller's capture is left as it was.
            cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
            CUDA_RUNTIME_CHECK(cudaStreamIsCapturing(s, &capture));
            GRACE_CHECK_ARG(capture == cudaStreamCaptureStatusNone || !not_capturable, "GpuMoeLayer ", name(),
                            ": cannot be captured in a CUDA graph: ", not_capturable);
            capturing = capture != cudaStreamCaptureStatusNone;
        }
        acquire(stream_mode ? s : nullptr);
        async = stream_mode;
        stream = stream_mode ? s : nullptr;
        comm.set_stream(stream);
        if (capturing) {
            // h_local is not written by a captured call; the stream orders it after earlier work.
        } else if (async && host_free) {
            CUDA_RUNTIME_CHECK(cudaStreamWaitEvent(s, staging_free, 0));  // h_local's previous copies first
        } else if (async) {
            // The arena's regions of the previous call may still be in flight (another stream).
            CUDA_RUNTIME_CHECK(cudaEventSynchronize(staging_free));
            staging.reset();
        }
        stats = MoeCallStats{};
        dest_pending = false;  // a general-path call sets dest itself; forward_local sets this again at its end
        dest_captured = false;
        t_start = Clock::now();
        t0 = t_start;
        open_call = ++calls;
        experts_ran = false;
        expert_partials = nullptr;
    }
    void check_handle(const GpuDispatchHandle& h) const {
        GRACE_CHECK_ARG(h.call != 0, "GpuMoeLayer: the dispatch handle was already combined (or is empty)");
        GRACE_CHECK_ARG(h.call == open_call,
                        "GpuMoeLayer: the dispatch handle is stale (a later dispatch or a failed "
                        "call replaced it; one dispatch may be open per layer)");
    }
    // GpuMoeLayer::dispatch with int32 or int64 ids (exactly one non-null unless num_tokens is 0).
    GpuDispatchHandle dispatch(const void* hidden_bf16, const int32_t* ids32, const int64_t* ids_64,
                               const float* topk_weights, int64_t num_tokens, int top_k, void* stream,
                               int64_t first_token);
    void dispatch_phase(const bf16* hidden, int64_t T, int k);
    void experts_phase();
    void combine_phase(const bf16* partials, float* out_dev);
    void forward(const bf16* hidden, int64_t T, int k, float* out_dev, int64_t first_token);
    // One GPU holds every expert once and needs no exchange: forward_async's work is the local expert layer on
    // the slots of the ids. Not for the `flat` scheme (one copy per selection rounds each selection's output to
    // bf16 before the sum, which the local layer does not) and not while instances are counted.
    bool local_shortcut() const { return G == 1 && options.scheme != CommScheme::kFlat && !counting; }
    void forward_local(const void* hidden, const int32_t* ids32, const int64_t* ids_64, const float* topk_weights,
                       int64_t T, int k, float* out, cudaStream_t s);
    void build_pending_dest();
};

// Synchronous mode: the legacy stream, every stage synchronized for its timing (the statistics of forward()).
void GpuMoeLayer::Impl::forward(const bf16* hidden, int64_t T, int k, float* out_dev, int64_t first_token) {
    try {
        begin_call(false, nullptr);
        for (int64_t i = 0; i < T * k; ++i)
            GRACE_CHECK_ARG(h_ids[i] < E, "topk_ids[", i / k, ", ", i % k, "] = ", h_ids[i], " is outside [0, ", E,
                            ")");
        route(d_ids.data(), T, k, first_token);
        stats.routing_s = seconds_since(t0);
        dispatch_phase(hidden, T, k);
        experts_phase();
        combine_phase(expert_partials, out_dev);
    } catch (...) {
        close_call();
        throw;
    }
}

// Layout on the host (h_ids, h_w, dest set), the exchanges of dispatch; the received rows are those of
// last_stage / last_dev.
void GpuMoeLayer::Impl::dispatch_phase(const bf16* hidden, int64_t T, int k) {
    stats.local_selections = T * k;
    call_T = T;
    call_k = k;
    t0 = Clock::now();
    auto rec2 = [&](std::vector<int32_t>& meta, int32_t slot_id, float w) {
        int32_t wb;
        std::memcpy(&wb, &w, 4);
        meta.push_back(slot_id), meta.push_back(wb);
    };
    acc_rows = T;
    if (options.scheme == CommScheme::kFlat || options.scheme == CommScheme::kFlatDedup) {
        const bool dedup = options.scheme == CommScheme::kFlatDedup;
        Stage& s = s1;
        s.reset(CommGroup::kGlobal, G, me, dedup ? k : 1, 2);
        for (int64_t t = 0; t < T; ++t) {
            const int32_t* d = dest.data() + t * k;
            for (int j = 0; j < k; ++j) {
                if (d[j] < 0) continue;
                if (!dedup) {
                    s.src[d[j]].push_back(static_cast<int32_t>(t));
                    s.acc[d[j]].push_back(static_cast<int32_t>(t));
                    rec2(s.meta[d[j]], slot(d[j], h_ids[t * k + j]), h_w[t * k + j]);
                    continue;
                }
                if (!first_to_gpu(d, j)) continue;
                s.src[d[j]].push_back(static_cast<int32_t>(t));
                s.acc[d[j]].push_back(static_cast<int32_t>(t));
                for (int i = 0; i < k; ++i)
                    if (d[i] == d[j])
                        rec2(s.meta[d[j]], slot(d[j], h_ids[t * k + i]), h_w[t * k + i]);
                    else
                        rec2(s.meta[d[j]], -1, 0.0f);
            }
        }
        stats.layout_s = seconds_since(t0);
        t0 = Clock::now();
        dispatch_stage(s, ds1, hidden, hidden);
        finish(s);
        stats.dispatch_s = seconds_since(t0);
        last_stage = &s1, last_dev = &ds1;
        return;
    }
    // Stage 1: one copy per (token, other destination node) to this rank's peer there, records {e, dest, w}.
    Stage& a = s1;
    a.reset(CommGroup::kGlobal, G, me, k, 3);
    for (int64_t t = 0; t < T; ++t) {
        const int32_t* d = dest.data() + t * k;
        for (int j = 0; j < k; ++j) {
            if (d[j] < 0) continue;
            const int b = topo.node_of(d[j]);
            if (b == my_node) continue;
            if (!first_to_node(d, j, topo)) continue;
            const int peer = topo.gpu_at(b, my_local);
            a.src[peer].push_back(static_cast<int32_t>(t));
            a.acc[peer].push_back(static_cast<int32_t>(t));
            for (int i = 0; i < k; ++i) {
                const bool on_b = d[i] >= 0 && topo.node_of(d[i]) == b;
                float w = on_b ? h_w[t * k + i] : 0.0f;
                int32_t wb;
                std::memcpy(&wb, &w, 4);
                a.meta[peer].push_back(on_b ? h_ids[t * k + i] : -1);
                a.meta[peer].push_back(on_b ? d[i] : -1);
                a.meta[peer].push_back(wb);
            }
        }
    }
    stats.layout_s = seconds_since(t0);
    t0 = Clock::now();
    dispatch_stage(a, ds1, hidden, hidden);
    const double stage1_start_s = seconds_since(t0);

    // Stage 2: entries are the own tokens (gather index t, accumulator row t) and the received stage-1 rows
    // (gather index -(r+1), accumulator row T + r); one copy per (entry, destination GPU on this node). The
    // own tokens are queued while stage 1 is in flight.
    t0 = Clock::now();
    Stage& s = s2;
    s.reset(CommGroup::kNode, topo.gpus_per_node, my_local, k, 2);
    auto queue = [&](int32_t src, int32_t acc_row, const int32_t* e, const int32_t* d, const float* w) {
        for (int j = 0; j < k; ++j) {
            if (e[j] < 0 || d[j] < 0 || topo.node_of(d[j]) != my_node) continue;
            bool first = true;
            for (int i = 0; i < j; ++i) first = first && !(e[i] >= 0 && d[i] == d[j]);
            if (!first) continue;
            const int q = topo.local_index(d[j]);
            s.src[q].push_back(src);
            s.acc[q].push_back(acc_row);
            for (int i = 0; i < k; ++i)
                if (e[i] >= 0 && d[i] == d[j])
                    rec2(s.meta[q], slot(d[j], e[i]), w[i]);
                else
                    rec2(s.meta[q], -1, 0.0f);
        }
    };
    for (int64_t t = 0; t < T; ++t)
        queue(static_cast<int32_t>(t), static_cast<int32_t>(t), h_ids.data() + t * k, dest.data() + t * k,
              h_w.data() + t * k);
    stats.overlap_s = seconds_since(t0);
    stats.layout_s += stats.overlap_s;
    t0 = Clock::now();
    finish(a);
    stats.dispatch_s = stage1_start_s + seconds_since(t0);
    t0 = Clock::now();
    // The stage-1 records name the stage-2 destinations: the host needs them (stream mode: the second and last
    // host wait of an HSC dispatch).
    std::vector<int32_t> m1(static_cast<size_t>(a.total_recv) * k * 3);
    if (!m1.empty()) {
        if (async) {
            CUDA_RUNTIME_CHECK(
                cudaMemcpyAsync(m1.data(), ds1.meta_recv.data(), m1.size() * 4, cudaMemcpyDeviceToHost, stream));
            host_wait(stream, wait_event, comm.timeout_s(), me, "HSC stage-1 records to the host");
        } else {
            CUDA_RUNTIME_CHECK(cudaMemcpy(m1.data(), ds1.meta_recv.data(), m1.size() * 4, cudaMemcpyDeviceToHost));
        }
    }
    std::vector<int32_t> e(k), d(k);
    std::vector<float> w(k);
    for (int64_t r = 0; r < a.total_recv; ++r) {
        for (int j = 0; j < k; ++j) {
            const int32_t* rec = m1.data() + (r * k + j) * 3;
            e[j] = rec[0], d[j] = rec[1];
            std::memcpy(&w[j], &rec[2], 4);
            GRACE_CHECK(e[j] < 0 || (d[j] >= 0 && topo.node_of(d[j]) == my_node), ErrorCode::kInternal,
                        "HSC stage 1 delivered a selection for GPU ", d[j], " to rank ", me);
        }
        queue(static_cast<int32_t>(-r - 1), static_cast<int32_t>(T + r), e.data(), d.data(), w.data());
    }
    acc_rows = T + a.total_recv;
    stats.layout_s += seconds_since(t0);
    t0 = Clock::now();
    dispatch_stage(s, ds2, hidden, ds1.payload_recv.data());
    finish(s);
    stats.dispatch_s += seconds_since(t0);
    last_stage = &s2, last_dev = &ds2;
}

// The layer's own experts on the received rows; their outputs (receive order) in expert_partials.
void GpuMoeLayer::Impl::experts_phase() {
    t0 = Clock::now();
    expert_partials = run_experts(*last_stage, *last_dev);
    if (!async) CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    stats.expert_s = seconds_since(t0);
    experts_ran = true;
}

// Sends `partials` (one bf16 row per received copy, receive order) back and reduces into out_dev [T, H] fp32.
void GpuMoeLayer::Impl::combine_phase(const bf16* partials, float* out_dev) {
    const int64_t T = call_T;
    t0 = Clock::now();
    acc.reserve(std::max<int64_t>(1, acc_rows) * H);
    CUDA_RUNTIME_CHECK(cudaMemsetAsync(acc.data(), 0, static_cast<size_t>(acc_rows) * H * 4, stream));
    if (last_stage == &s1) {
        combine_stage(s1, ds1, partials);
    } else {
        combine_stage(s2, ds2, partials);
        // Stage 1 back: the node's partial sums (fp32 rows T..) as bf16 to the origin.
        const int64_t nf = s1.total_recv * H;
        acc_bf16.reserve(std::max<int64_t>(1, nf));
        detail::to_bf16(acc.data() + T * H, nf, acc_bf16.data(), stream);
        combine_stage(s1, ds1, acc_bf16.data());
    }
    if (T > 0)
        CUDA_RUNTIME_CHECK(
            cudaMemcpyAsync(out_dev, acc.data(), static_cast<size_t>(T) * H * 4, cudaMemcpyDeviceToDevice, stream));
    if (async)
        CUDA_RUNTIME_CHECK(cudaEventRecord(staging_free, stream));
    else
        CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    close_call();
    stats.combine_s = seconds_since(t0);
    stats.total_s = seconds_since(t_start);
}

GpuMoeLayer::GpuMoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
                         std::vector<ExpertWeights> local_experts, const GpuMoeLayerOptions& options)
    : impl_(std::make_unique<Impl>(layer, topology, communicator, options)) {
    setup(layer, topology, communicator, &local_experts, 0, 0);
}

GpuMoeLayer::GpuMoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator, int hidden,
                         int intermediate, const GpuMoeLayerOptions& options)
    : impl_(std::make_unique<Impl>(layer, topology, communicator, options)) {
    setup(layer, topology, communicator, nullptr, hidden, intermediate);
}

void GpuMoeLayer::setup(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
                        const std::vector<ExpertWeights>* given, int hidden, int intermediate) {
    Impl& m = *impl_;
    const GpuMoeLayerOptions& options = m.options;
    static const std::vector<ExpertWeights> kNone;
    const std::vector<ExpertWeights>& local_experts = given ? *given : kNone;
    GRACE_CHECK(options.scheme == CommScheme::kFlat || options.scheme == CommScheme::kFlatDedup ||
                    options.scheme == CommScheme::kHsc,
                ErrorCode::kUnsupported, "the GPU MoE layer runs flat, flat-dedup and hsc, not '",
                to_string(options.scheme), "'");
    GRACE_CHECK_ARG(communicator.memory_space() == MemorySpace::kDevice,
                    "GpuMoeLayer needs a device-memory "
                    "communicator (backend 'nccl'), got '",
                    communicator.backend(), "'");
    GRACE_CHECK_ARG(communicator.topology().nodes == topology.nodes &&
                        communicator.topology().gpus_per_node == topology.gpus_per_node,
                    "communicator topology ", communicator.topology().to_string(), " differs from the layer's ",
                    topology.to_string());
    m.G = topology.num_gpus();
    m.me = communicator.rank();
    m.my_node = topology.node_of(m.me);
    m.my_local = topology.local_index(m.me);
    m.E = static_cast<int>(layer.primary_gpu.size());
    GRACE_CHECK_ARG(static_cast<int>(layer.gpu_experts.size()) == m.G, "layer ", layer.layer, " plan has ",
                    layer.gpu_experts.size(), " GPUs but the topology has ", m.G);
    m.slot_of.assign(static_cast<size_t>(m.G) * m.E, -1);
    for (int g = 0; g < m.G; ++g)
        for (size_t i = 0; i < layer.gpu_experts[g].size(); ++i) {
            const int e = layer.gpu_experts[g][i];
            GRACE_CHECK_ARG(e >= 0 && e < m.E, "layer ", layer.layer, " GPU ", g, " holds expert ", e, " outside [0, ",
                            m.E, ")");
            m.slot_of[static_cast<size_t>(g) * m.E + e] = static_cast<int32_t>(i);
        }
    const auto& mine = layer.gpu_experts[m.me];
    m.n_local = static_cast<int>(mine.size());
    GRACE_CHECK_ARG(!given || local_experts.size() == mine.size(), "rank ", m.me, " was given ", local_experts.size(),
                    " experts but the plan puts ", mine.size(), " on it in layer ", layer.layer);
    std::vector<const ExpertWeights*> by_slot(mine.size(), nullptr);
    for (const auto& w : local_experts) {
        const int s = w.expert >= 0 && w.expert < m.E ? m.slot(m.me, w.expert) : -1;
        GRACE_CHECK_ARG(s >= 0, "local expert ", w.expert, " is not on rank ", m.me, " in layer ", layer.layer);
        GRACE_CHECK_ARG(!by_slot[s], "local expert ", w.expert, " given twice");
        GRACE_CHECK_ARG(w.shape == local_experts[0].shape, "local expert ", w.expert, " has another shape");
        by_slot[s] = &w;
    }
    std::vector<double> shape{local_experts.empty() ? double(hidden) : local_experts[0].shape.hidden,
                              local_experts.empty() ? double(intermediate) : local_experts[0].shape.intermediate};
    communicator.allreduce_max(shape);
    m.H = static_cast<int>(shape[0]);
    m.I = static_cast<int>(shape[1]);
    // Without weights, I may be 0 (given later by set_expert_weights).
    GRACE_CHECK_ARG(m.H > 0 && m.H % 8 == 0 && (m.I > 0 || !given) && m.I >= 0 && m.I % 8 == 0,
                    "GpuMoeLayer needs H and I positive multiples "
                    "of 8, got H=",
                    m.H, " I=", m.I);
    for (const auto& w : local_experts)
        GRACE_CHECK_ARG(w.shape.hidden == m.H && w.shape.intermediate == m.I, "rank ", m.me, " expert ", w.expert,
                        " has H=", w.shape.hidden, " I=", w.shape.intermediate, ", another rank has H=", m.H,
                        " I=", m.I);
    GRACE_CHECK_ARG(given || (hidden == m.H && intermediate == m.I), "rank ", m.me, " was given H=", hidden,
                    " I=", intermediate, ", another rank H=", m.H, " I=", m.I);
    if (given && m.n_local > 0) {
        const size_t HI = static_cast<size_t>(m.H) * m.I;
        std::vector<uint16_t> w13(2 * HI * m.n_local), w2(HI * m.n_local);
        auto put = [](const ExpertWeights& w, const std::vector<float>& f, const std::vector<uint16_t>& b,
                      uint16_t* dst, size_t n) {
            if (w.storage == DType::kBF16)
                std::memcpy(dst, b.data(), n * 2);
            else
                for (size_t i = 0; i < n; ++i) dst[i] = float_to_bf16(f[i]);
        };
        for (int s = 0; s < m.n_local; ++s) {
            const ExpertWeights& w = *by_slot[s];
            put(w, w.gate, w.gate_bf16, w13.data() + 2 * HI * s, HI);
            put(w, w.up, w.up_bf16, w13.data() + 2 * HI * s + HI, HI);
            put(w, w.down, w.down_bf16, w2.data() + HI * s, HI);
        }
        m.w13.resize(w13.size());
        m.w2.resize(w2.size());
        CUDA_RUNTIME_CHECK(cudaMemcpy(m.w13.data(), w13.data(), w13.size() * 2, cudaMemcpyHostToDevice));
        CUDA_RUNTIME_CHECK(cudaMemcpy(m.w2.data(), w2.data(), w2.size() * 2, cudaMemcpyHostToDevice));
        m.w13_ptr = m.w13.data();
        m.w2_ptr = m.w2.data();
    }
    if (options.policy == RoutingPolicy::kWrr || options.policy == RoutingPolicy::kTar ||
        options.policy == RoutingPolicy::kPrimary)
        m.gpu_router = std::make_unique<GpuReplicaRouter>(build_route_table(m.layer, topology, options.policy));
}

GpuMoeLayer::~GpuMoeLayer() = default;

// forward_async on one GPU (local_shortcut): ids -> slots on the device, LocalMoe, its bf16 sums widened into out
// by its last kernel.
// The same output bit for bit as the dispatch/experts/combine path there (which sends each token once, with its k
// records, to this GPU's LocalMoe and adds the bf16 result to zeros), without its host layout and with one host
// wait, for the bad-id check, that returns as soon as the ids are mapped: the expert GEMMs are queued by then.
// Without the host id check the call queues kernels only and can be captured in a CUDA graph: its buffers must
// then exist already (an earlier uncaptured call at least as large), and it copies nothing to the host.
void GpuMoeLayer::Impl::forward_local(const void* hidden, const int32_t* ids32, const int64_t* ids_64,
                                      const float* topk_weights, int64_t T, int k, float* out, cudaStream_t s) {
    GRACE_CHECK_ARG(T >= 0 && T < (int64_t{1} << 31) / std::max(1, H) && k >= 1, "GpuMoeLayer: num_tokens ", T,
                    ", top_k ", k);
    GRACE_CHECK_ARG(T == 0 || (hidden && (ids32 || ids_64) && topk_weights && out),
                    "GpuMoeLayer::forward_async: null input");
    GRACE_CHECK_ARG(T == 0 || (aligned16(hidden) && aligned16(out)),
                    "GpuMoeLayer::forward_async: hidden and out must start on 16-byte boundaries");
    const int64_t n = T * k;
    try {
        begin_call(true, s, !host_id_check,
                   host_id_check ? "the expert ids' range check waits on the host (turn it off to capture: "
                                   "set_host_id_check(false), grace.ep Buffer(check_ids=False))"
                                 : nullptr);
        dest.clear();  // built from the copied slots when asked for (build_pending_dest)
        last_on_device = true;
        stats.local_selections = n;
        call_T = T, call_k = k;
        if (capturing && T > 0) {
            // Checked before anything is queued: a refused call leaves the caller's capture as it was.
            GRACE_CHECK_ARG(d_slot_of.size() >= static_cast<size_t>(E) && loc_slot.size() >= static_cast<size_t>(n) &&
                                local_moe_has_shape(k) && T <= local_moe_cap,
                            "GpuMoeLayer ", name(), ": a call captured in a CUDA graph needs its buffers allocated "
                            "beforehand: make one uncaptured call with at least ", T, " tokens (top_k ", k,
                            ") on this layer first");
            GRACE_CHECK_ARG(local_moe->backend() == GroupedGemmBackend::kSm90, "GpuMoeLayer ", name(),
                            ": only the sm90 GEMM backend can be captured in a CUDA graph (the cuBLAS backends "
                            "read the per-expert counts on the host)");
        }
        if (T > 0) {
            if (d_slot_of.size() < static_cast<size_t>(E)) {
                d_slot_of.resize(E);
                CUDA_RUNTIME_CHECK(cudaMemcpy(d_slot_of.data(), slot_of.data(), static_cast<size_t>(E) * 4,
                                              cudaMemcpyHostToDevice));
                d_first_bad.resize(1);
            }
            if (!capturing && h_local_size < static_cast<size_t>(n) + 1) {
                // Without the host id check the last call's copies into h_local may still be in flight.
                CUDA_RUNTIME_CHECK(cudaEventSynchronize(staging_free));
                if (h_local) cudaFreeHost(h_local);
                h_local = nullptr, h_local_size = 0;
                CUDA_RUNTIME_CHECK(cudaMallocHost(&h_local, (static_cast<size_t>(n) + 1) * 4));
                h_local_size = static_cast<size_t>(n) + 1;
            }
            reserve_slots(n);
            // Without the host check an id >= E still maps to no slot (the kernel's flag is then never read).
            if (host_id_check)
                CUDA_RUNTIME_CHECK(cudaMemsetAsync(d_first_bad.data(), 0x7f, 4, s));  // above every index (n < 2^31)
            detail::map_slots(ids32, ids_64, n, E, d_slot_of.data(), loc_slot.data(), d_first_bad.data(), s);
            if (host_id_check) {
                CUDA_RUNTIME_CHECK(cudaMemcpyAsync(h_local, d_first_bad.data(), 4, cudaMemcpyDeviceToHost, s));
                CUDA_RUNTIME_CHECK(cudaEventRecord(ids_checked, s));
            }
            LocalMoe& moe = local_moe_for(k, T);
            moe.forward_f32(hidden, loc_slot.data(), topk_weights, out, static_cast<int>(T), s);
            if (capturing) {
                // The graph holds these buffers: growing them later keeps them alive (reserve_slots, local_moe_for).
                ws.slots_in_graph = ws.moe_in_graph = true;
                dest_captured = true;
            } else {
                // The slots for last_dest_ranks, copied behind the work (read only if asked for).
                CUDA_RUNTIME_CHECK(cudaMemcpyAsync(h_local + 1, loc_slot.data(), static_cast<size_t>(n) * 4,
                                                   cudaMemcpyDeviceToHost, s));
                CUDA_RUNTIME_CHECK(cudaEventRecord(slots_copied, s));
                // The next call (any stream) waits for this one's copies into h_local before reusing it.
                CUDA_RUNTIME_CHECK(cudaEventRecord(staging_free, s));
            }
            stats.routing_s = seconds_since(t0);
            if (host_id_check) event_wait(ids_checked, comm.timeout_s(), me, "the expert ids' range check");
            if (host_id_check && h_local[0] != 0x7f7f7f7f) {
                const int64_t i = h_local[0];
                int64_t v = 0;
                if (ids_64) {
                    CUDA_RUNTIME_CHECK(cudaMemcpy(&v, ids_64 + i, sizeof v, cudaMemcpyDeviceToHost));
                } else {
                    int32_t v32 = 0;
                    CUDA_RUNTIME_CHECK(cudaMemcpy(&v32, ids32 + i, sizeof v32, cudaMemcpyDeviceToHost));
                    v = v32;
                }
                GRACE_CHECK_ARG(false, "topk_ids[", i / k, ", ", i % k, "] = ", v, " is outside [0, ", E, ")");
            }
            dest_pending = !capturing;
            dest_pending_n = n;
        }
        close_call();
        stats.total_s = seconds_since(t_start);
    } catch (...) {
        dest_pending = false;
        close_call();
        throw;
    }
}

// The last forward_local's destinations: rank 0 for every selection with a slot, -1 for none.
void GpuMoeLayer::Impl::build_pending_dest() {
    CUDA_RUNTIME_CHECK(cudaEventSynchronize(slots_copied));
    dest.resize(static_cast<size_t>(dest_pending_n));
    for (int64_t i = 0; i < dest_pending_n; ++i) dest[i] = h_local[1 + i] >= 0 ? 0 : -1;
    dest_pending = false;
}

void GpuMoeLayer::forward_device(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights,
                                 int64_t num_tokens, int top_k, float* out, int64_t first_token) {
    auto& m = *impl_;
    GRACE_CHECK_ARG(num_tokens >= 0 && num_tokens < (int64_t{1} << 31) / std::max(1, m.H) && top_k >= 1,
                    "GpuMoeLayer: num_tokens ", num_tokens, ", top_k ", top_k);
    const size_t n = static_cast<size_t>(num_tokens) * top_k;
    m.h_ids.resize(n);
    m.h_w.resize(n);
    try {
        m.acquire(nullptr);  // before the workspace's d_ids is written
        if (n) {
            CUDA_RUNTIME_CHECK(cudaMemcpy(m.h_ids.data(), topk_ids, n * 4, cudaMemcpyDeviceToHost));
            CUDA_RUNTIME_CHECK(cudaMemcpy(m.h_w.data(), topk_weights, n * 4, cudaMemcpyDeviceToHost));
        }
        // The router reads its ids from d_ids.
        m.d_ids.reserve(std::max<size_t>(1, n));
        if (n) CUDA_RUNTIME_CHECK(cudaMemcpy(m.d_ids.data(), topk_ids, n * 4, cudaMemcpyDeviceToDevice));
    } catch (...) {
        m.close_call();
        throw;
    }
    m.forward(static_cast<const bf16*>(hidden_bf16), num_tokens, top_k, out, first_token);
}

void GpuMoeLayer::forward(const float* hidden, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                          int top_k, float* out, int64_t first_token) {
    auto& m = *impl_;
    GRACE_CHECK_ARG(num_tokens >= 0 && num_tokens < (int64_t{1} << 31) / std::max(1, m.H) && top_k >= 1,
                    "GpuMoeLayer: num_tokens ", num_tokens, ", top_k ", top_k);
    const size_t n = static_cast<size_t>(num_tokens) * top_k, nh = static_cast<size_t>(num_tokens) * m.H;
    m.h_ids.assign(topk_ids, topk_ids + n);
    m.h_w.assign(topk_weights, topk_weights + n);
    std::vector<uint16_t> xb(nh);
    for (size_t i = 0; i < nh; ++i) xb[i] = float_to_bf16(hidden[i]);
    DeviceBuffer<float> d_out(std::max<size_t>(1, nh));
    try {
        m.acquire(nullptr);  // before the workspace's d_hidden and d_ids are written
        m.d_hidden.reserve(std::max<size_t>(1, nh));
        m.d_ids.reserve(std::max<size_t>(1, n));
        if (nh) CUDA_RUNTIME_CHECK(cudaMemcpy(m.d_hidden.data(), xb.data(), nh * 2, cudaMemcpyHostToDevice));
        if (n) CUDA_RUNTIME_CHECK(cudaMemcpy(m.d_ids.data(), topk_ids, n * 4, cudaMemcpyHostToDevice));
    } catch (...) {
        m.close_call();
        throw;
    }
    m.forward(m.d_hidden.data(), num_tokens, top_k, d_out.data(), first_token);
    if (nh) CUDA_RUNTIME_CHECK(cudaMemcpy(out, d_out.data(), nh * 4, cudaMemcpyDeviceToHost));
}

std::vector<float> GpuMoeLayer::forward(const std::vector<float>& hidden, const std::vector<int32_t>& topk_ids,
                                        const std::vector<float>& topk_weights, int top_k, int64_t first_token) {
    const int64_t T = forward_num_tokens(hidden.size(), topk_ids.size(), topk_weights.size(), top_k, impl_->H);
    std::vector<float> out(static_cast<size_t>(T) * impl_->H);
    forward(hidden.data(), topk_ids.data(), topk_weights.data(), T, top_k, out.data(), first_token);
    return out;
}

void GpuMoeLayer::set_expert_weights(const void* w13_bf16, const void* w2_bf16, int intermediate) {
    auto& m = *impl_;
    GRACE_CHECK_ARG(intermediate >= 0 && intermediate % 8 == 0, "GpuMoeLayer::set_expert_weights: intermediate ",
                    intermediate, " is not a multiple of 8");
    GRACE_CHECK_ARG(m.n_local == 0 || (w13_bf16 && w2_bf16), "GpuMoeLayer::set_expert_weights on rank ", m.me,
                    ": null weight pointer for ", m.n_local, " local experts");
    GRACE_CHECK_ARG(m.open_call == 0, "GpuMoeLayer::set_expert_weights on rank ", m.me,
                    " between dispatch and combine");
    // A new I rebuilds LocalMoe's workspace at the next experts call (run_experts compares the shape).
    if (intermediate > 0) m.I = intermediate;
    GRACE_CHECK_ARG(m.I > 0, "GpuMoeLayer::set_expert_weights: the intermediate size is not known (pass it)");
    m.w13_ptr = w13_bf16;
    m.w2_ptr = w2_bf16;
}

GpuDispatchHandle GpuMoeLayer::dispatch(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights,
                                        int64_t num_tokens, int top_k, void* stream, int64_t first_token) {
    return impl_->dispatch(hidden_bf16, topk_ids, nullptr, topk_weights, num_tokens, top_k, stream, first_token);
}

GpuDispatchHandle GpuMoeLayer::dispatch(const void* hidden_bf16, const int64_t* topk_ids, const float* topk_weights,
                                        int64_t num_tokens, int top_k, void* stream, int64_t first_token) {
    return impl_->dispatch(hidden_bf16, nullptr, topk_ids, topk_weights, num_tokens, top_k, stream, first_token);
}

GpuDispatchHandle GpuMoeLayer::Impl::dispatch(const void* hidden_bf16, const int32_t* ids32, const int64_t* ids_64,
                                              const float* topk_weights, int64_t num_tokens, int top_k, void* stream_,
                                              int64_t first_token) {
    auto& m = *this;
    GRACE_CHECK_ARG(num_tokens >= 0 && num_tokens < (int64_t{1} << 31) / std::max(1, m.H) && top_k >= 1,
                    "GpuMoeLayer: num_tokens ", num_tokens, ", top_k ", top_k);
    GRACE_CHECK_ARG(num_tokens == 0 || (hidden_bf16 && (ids32 || ids_64) && topk_weights),
                    "GpuMoeLayer::dispatch: null input");
    GRACE_CHECK_ARG(num_tokens == 0 || aligned16(hidden_bf16),
                    "GpuMoeLayer::dispatch: hidden must start on a 16-byte boundary");
    auto s = static_cast<cudaStream_t>(stream_);
    try {
        m.begin_call(true, s);
        const int32_t* ids = ids32;
        m.ids64 = ids_64;
        if (ids_64) {
            // Narrowed into the workspace's id buffer (acquired above), in stream order before the router reads it.
            const size_t n = static_cast<size_t>(num_tokens) * top_k;
            m.d_ids.reserve(std::max<size_t>(1, n));
            detail::narrow_ids(ids_64, static_cast<int64_t>(n), m.E, m.d_ids.data(), s);
            ids = m.d_ids.data();
        }
        m.route_async(ids, topk_weights, num_tokens, top_k, first_token);
        m.ids64 = nullptr;
        m.stats.routing_s = seconds_since(m.t0);
        m.dispatch_phase(static_cast<const bf16*>(hidden_bf16), num_tokens, top_k);
        // The arena's regions stay in use until here: a dispatch that is never combined must not let the next
        // call overwrite them early.
        CUDA_RUNTIME_CHECK(cudaEventRecord(m.staging_free, s));
    } catch (...) {
        m.ids64 = nullptr;
        m.close_call();
        throw;
    }
    GpuDispatchHandle h;
    h.call = m.open_call;
    h.num_tokens = num_tokens;
    h.top_k = top_k;
    h.num_recv = m.last_stage->total_recv;
    h.records = m.last_stage->recs;
    return h;
}

void GpuMoeLayer::received(const GpuDispatchHandle& handle, void* recv_x_bf16, int32_t* recv_slot, float* recv_weights,
                           void* stream) const {
    auto& m = *impl_;
    m.check_handle(handle);
    const int64_t R = handle.num_recv;
    if (R == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    CUDA_RUNTIME_CHECK(cudaMemcpyAsync(recv_x_bf16, m.last_dev->payload_recv.data(), static_cast<size_t>(R) * m.H * 2,
                                       cudaMemcpyDeviceToDevice, s));
    detail::split_meta_padded(m.last_dev->meta_recv.data(), R, handle.records, handle.top_k, recv_slot, recv_weights,
                              s);
}

void GpuMoeLayer::experts(GpuDispatchHandle& handle, void* stream) {
    auto& m = *impl_;
    m.check_handle(handle);
    GRACE_CHECK_ARG(!m.experts_ran, "GpuMoeLayer::experts: already run for this dispatch");
    GRACE_CHECK_ARG(static_cast<cudaStream_t>(stream) == m.stream,
                    "GpuMoeLayer::experts: another stream than "
                    "dispatch's");
    m.experts_phase();
}

void GpuMoeLayer::combine(GpuDispatchHandle& handle, const void* expert_out_bf16, float* out, void* stream) {
    auto& m = *impl_;
    m.check_handle(handle);
    GRACE_CHECK_ARG(static_cast<cudaStream_t>(stream) == m.stream,
                    "GpuMoeLayer::combine: another stream than "
                    "dispatch's");
    const bf16* partials = static_cast<const bf16*>(expert_out_bf16);
    if (!partials) {
        GRACE_CHECK_ARG(m.experts_ran || handle.num_recv == 0,
                        "GpuMoeLayer::combine: no expert output given and experts() was not run");
        partials = m.expert_partials;
    }
    GRACE_CHECK_ARG(handle.num_tokens == 0 || out, "GpuMoeLayer::combine: null output");
    GRACE_CHECK_ARG((handle.num_tokens == 0 || aligned16(out)) && (!expert_out_bf16 || aligned16(expert_out_bf16)),
                    "GpuMoeLayer::combine: expert_out and out must start on 16-byte boundaries");
    handle.call = 0;  // consumed, whatever happens below
    try {
        m.combine_phase(partials, out);
    } catch (...) {
        m.close_call();
        throw;
    }
}

void GpuMoeLayer::forward_async(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights,
                                int64_t num_tokens, int top_k, float* out, void* stream, int64_t first_token) {
    if (impl_->local_shortcut()) {
        impl_->forward_local(hidden_bf16, topk_ids, nullptr, topk_weights, num_tokens, top_k, out,
                             static_cast<cudaStream_t>(stream));
        return;
    }
    GpuDispatchHandle h = dispatch(hidden_bf16, topk_ids, topk_weights, num_tokens, top_k, stream, first_token);
    experts(h, stream);
    combine(h, nullptr, out, stream);
}

void GpuMoeLayer::forward_async(const void* hidden_bf16, const int64_t* topk_ids, const float* topk_weights,
                                int64_t num_tokens, int top_k, float* out, void* stream, int64_t first_token) {
    if (impl_->local_shortcut()) {
        impl_->forward_local(hidden_bf16, nullptr, topk_ids, topk_weights, num_tokens, top_k, out,
                             static_cast<cudaStream_t>(stream));
        return;
    }
    GpuDispatchHandle h = dispatch(hidden_bf16, topk_ids, topk_weights, num_tokens, top_k, stream, first_token);
    experts(h, stream);
    combine(h, nullptr, out, stream);
}

void GpuMoeLayer::set_host_id_check(bool on) { impl_->host_id_check = on; }

const MoeCallStats& GpuMoeLayer::last_stats() const { return impl_->stats; }
const std::vector<int32_t>& GpuMoeLayer::last_dest_ranks() const {
    GRACE_CHECK_ARG(!impl_->dest_captured, "GpuMoeLayer::last_dest_ranks: the last call was captured in a CUDA "
                    "graph; its destinations are not copied to the host");
    if (impl_->dest_pending) impl_->build_pending_dest();
    return impl_->dest;
}
bool GpuMoeLayer::routed_on_device() const { return impl_->last_on_device; }
int GpuMoeLayer::hidden() const { return impl_->H; }

void GpuMoeLayer::set_instance_counting(bool on) {
    GRACE_CHECK_ARG(impl_->gpu_router != nullptr, "instance counting needs a policy routed on the device");
    impl_->gpu_router->set_count_accumulation(on);
    impl_->counting = on;
}

void GpuMoeLayer::take_instance_counts(std::vector<int64_t>& counts) {
    GRACE_CHECK_ARG(impl_->gpu_router != nullptr, "instance counting needs a policy routed on the device");
    const std::vector<int64_t> c = impl_->gpu_router->take_counts();
    GRACE_CHECK_ARG(c.size() == counts.size(), "instance counts hold ", counts.size(), " entries, the layer has ",
                    c.size(), " instances");
    for (size_t i = 0; i < c.size(); ++i) counts[i] += c[i];
}

void GpuMoeLayer::set_wrr_weights(const std::vector<std::vector<int>>& weights) {
    auto& m = *impl_;
    m.host_router.set_wrr_weights(weights);  // throws for a policy other than wrr and tar
    m.layer.wrr_weights = weights;
    const std::vector<uint8_t> seq = m.host_router.flat_sequences();
    m.gpu_router->set_sequences(std::vector<int32_t>(seq.begin(), seq.end()), nullptr);
}

}  // namespace grace::cuda
