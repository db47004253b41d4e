#pragma once
/// @file cuda_layer.hpp
/// The expert-parallel MoE layer on GPUs: the same forward signature and the same dispatch schemes as
/// grace::MoeLayer (runtime.hpp), over a Communicator whose memory space is kDevice (the "nccl" backend:
/// one process per GPU). Built only with GRACE_USE_CUDA (library grace_cuda); CUDA-free header.
///
/// One forward call on one rank:
/// 1. Replica routing. WRR, TAR and primary run on the device (GpuReplicaRouter over the table of
///    build_route_table, identical picks to grace::ReplicaRouter, offsets carried across calls); vLLM and the
///    SGLang policies, which have no table, run on the host with grace::ReplicaRouter. The destinations
///    ([T, k] int32) are then copied to the host.
/// 2. Dispatch layout on the host (which rows go to which rank, in the CPU MoeLayer's order), as index lists
///    uploaded to the device; the payload rows are gathered on the device.
/// 3. Dispatch over the communicator: two variable all-to-alls per stage, payload (bf16 rows, H * 2 bytes per
///    copy) and metadata (per copy, `records` entries of {local expert slot at the destination, gate weight};
///    HSC stage 1: {expert, destination GPU, weight}). flat: one copy per selection (1 record); flat-dedup: one
///    copy per destination GPU (k records); hsc: stage 1 on the global group to the peer (same local index) of
///    each other destination node (zero-sized with every other rank), stage 2 on the node group. The copy to
///    the caller's own GPU goes through the same exchange (a device copy, not counted as traffic).
/// 4. LocalMoe (permute, grouped GEMMs, SiLU*up, weighted un-permute) on the received rows.
/// 5. Combine mirrors dispatch: bf16 partial sums go back, and are reduced in fp32 in a fixed order (HSC: inside
///    the destination node at the peer first, then one vector per (token, node) back across).
///
/// Numerics: hidden states and all wire payloads are bf16, GEMMs accumulate in fp32, the output is fp32. Against
/// the CPU MoeLayer (fp32 activations, the same bf16 weights) the relative L2 error of a rank's output is
/// about 4e-3; tests allow 2e-2.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "grace/communicator.hpp"
#include "grace/cuda_moe.hpp"
#include "grace/experts.hpp"
#include "grace/plan.hpp"
#include "grace/runtime.hpp"
#include "grace/topology.hpp"

namespace grace::cuda {

/// The "nccl" communicator over a caller-supplied host communicator (memory_space() == kHost, the same topology):
/// rank and topology are the host communicator's, the ncclUniqueId bootstrap and the host helpers (counts,
/// allgather, allreduce, barrier) go through it, and it is kept alive (shared) as long as the result. `device`:
/// this rank's CUDA device (-1: the machine-local rank modulo the device count, as make_communicator("nccl")).
/// Collective over the host communicator. Throws kInvalidArgument (null or device-memory host communicator,
/// topology mismatch, device out of range), kUnsupported without a CUDA device, kBackend for NCCL failures.
std::unique_ptr<Communicator> make_nccl_communicator(const CommunicatorOptions& options,
                                                     std::shared_ptr<Communicator> host, int device = -1);

/// One open dispatch of a GpuMoeLayer (returned by dispatch(), consumed by combine()). Only the latest dispatch of
/// a layer is open: a later dispatch or a failed call makes older handles stale (combine refuses them).
struct GpuDispatchHandle {
    uint64_t call = 0;       ///< the layer's call number; 0 = empty or already combined
    int64_t num_tokens = 0;  ///< T of the dispatch
    int top_k = 0;           ///< k of the dispatch
    int64_t num_recv = 0;    ///< R: rows this rank received (one per copy)
    int records = 0;         ///< selections carried per received row (flat: 1, flat-dedup and hsc: k)
};

/// Grow-only device scratch of GpuMoeLayer calls (the input staging, routing outputs, exchange send/receive
/// buffers, LocalMoe's workspace, the combine accumulators): everything a call needs only until it returns or,
/// for the phases, until its combine. Router state, weights, route tables and host staging stay in each layer.
/// Without one (GpuMoeLayerOptions::workspace == nullptr) a layer owns its own, as before; several layers on one
/// device may share one to keep one set of buffers (sized by the largest call of any of them) instead of one each.
///
/// Sharing is sequential: from a layer's dispatch (or forward) until its combine returns, the workspace belongs to
/// that layer; a call of another layer sharing it meanwhile throws kInvalidArgument naming both layers (combine
/// the open handle first). The next owner's work is ordered after the previous owner's last use on the device
/// (an event, so the layers may use different streams). All layers sharing one must use the same CUDA device
/// (else kInvalidArgument). Not thread-safe: the layers sharing it are called from one thread at a time.
class GpuWorkspace {
  public:
    GpuWorkspace();
    ~GpuWorkspace();
    GpuWorkspace(const GpuWorkspace&) = delete;
    GpuWorkspace& operator=(const GpuWorkspace&) = delete;
    /// Device bytes held by the exchange, routing and accumulator buffers (without LocalMoe's workspace).
    size_t buffer_bytes() const;
    /// True while a layer's dispatch is open (not yet combined) on it.
    bool in_use() const;
    struct Impl;  // defined with GpuMoeLayer

  private:
    friend class GpuMoeLayer;
    std::unique_ptr<Impl> impl_;
};

/// Options of a GpuMoeLayer.
struct GpuMoeLayerOptions {
    CommScheme scheme = CommScheme::kHsc;                 ///< dispatch/combine scheme
    RoutingPolicy policy = RoutingPolicy::kTar;           ///< replica routing policy
    uint64_t routing_seed = 0;                            ///< seed of the SGLang policies
    GroupedGemmBackend gemm = GroupedGemmBackend::kAuto;  ///< LocalMoe GEMM backend
    /// Scratch shared with other layers (see GpuWorkspace); nullptr = this layer's own.
    std::shared_ptr<GpuWorkspace> workspace;
};

/// One MoE layer on one rank's GPU (the current CUDA device, which the nccl communicator selected).
class GpuMoeLayer {
  public:
    /// `layer` finalized for `topology`; `communicator` with memory_space() == kDevice, the same topology, and
    /// outliving the layer; `local_experts` exactly the experts of layer.gpu_experts[communicator.rank()] (any
    /// order, one shape, H and I multiples of 8). Weights are converted to bf16 and uploaded. Throws
    /// kInvalidArgument naming what is inconsistent, kBackend for CUDA failures.
    GpuMoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
                std::vector<ExpertWeights> local_experts, const GpuMoeLayerOptions& options = {});
    /// Without weights: every rank gives the same `hidden` and `intermediate` (multiples of 8; hidden > 0,
    /// intermediate 0 = not known yet); the weights are the caller's device arrays, given with
    /// set_expert_weights() before the first call that runs the layer's experts.
    GpuMoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator, int hidden,
                int intermediate, const GpuMoeLayerOptions& options = {});
    ~GpuMoeLayer();
    GpuMoeLayer(const GpuMoeLayer&) = delete;
    GpuMoeLayer& operator=(const GpuMoeLayer&) = delete;

    /// Collective over all ranks, host pointers, the CPU MoeLayer's contract: hidden [num_tokens, H] fp32
    /// (rounded to bf16 on upload), topk_ids [num_tokens, k] (-1 = none), topk_weights [num_tokens, k]; writes
    /// out [num_tokens, H] fp32. `first_token`: global index of this rank's first token (vLLM, SGLang dynamic).
    void forward(const float* hidden, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens, int top_k,
                 float* out, int64_t first_token = 0);
    /// Vector form: returns [num_tokens, H].
    std::vector<float> forward(const std::vector<float>& hidden, const std::vector<int32_t>& topk_ids,
                               const std::vector<float>& topk_weights, int top_k, int64_t first_token = 0);
    /// Device form: hidden bf16 [num_tokens, H], topk_ids int32 and topk_weights float [num_tokens, k], out fp32
    /// [num_tokens, H], all device memory; returns when out is written (synchronizes the device).
    void forward_device(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                        int top_k, float* out, int64_t first_token = 0);

    /// Uses the caller's device bf16 weights from now on, not copied: w13 [S, 2I, H] (gate rows 0..I-1, up rows
    /// I..2I-1), w2 [S, H, I], S = layer.gpu_experts[rank].size(), row s = the expert at position s of that list.
    /// They must stay valid and unchanged while calls that use them run (stream order). `intermediate` > 0 sets
    /// I (this rank's experts only; 0 keeps the constructor's, which must then be > 0). Not between dispatch and
    /// combine.
    void set_expert_weights(const void* w13_bf16, const void* w2_bf16, int intermediate = 0);

    /// Stream-ordered phases (the grace.ep CUDA backend). All pointers are device memory; `stream` is a
    /// cudaStream_t (nullptr = the legacy default stream); every call is collective like forward(). Work is
    /// queued on `stream` and the calls return without waiting for it, except where the host needs device data:
    ///  1. dispatch: one host wait after the routing, for the [T, k] ids, weights and destinations (the dispatch
    ///     layout is planned on the host); with hsc a second one after stage 1, for the received stage-1 records
    ///     (they name the stage-2 destinations). The exchange counts are a host collective (no device wait).
    ///  2. experts: none with the sm90 GEMM; the cuBLAS GEMM backends wait once for the per-expert counts.
    ///  3. combine: none.
    /// Exchanges complete on `stream` (CommRequest::wait_on_stream), so their deadline is not checked there; the
    /// host waits above poll with the communicator's deadline instead. Device buffers that must grow are
    /// reallocated (cudaFree synchronizes the device), so the first calls at a new size also wait. Not capturable
    /// in a CUDA graph (the host waits): a call on a capturing stream is refused (kInvalidArgument) before it
    /// queues anything; the one exception is forward_async's one-GPU path without the host id check (below).
    /// Phase calls fill last_stats()' byte counts; its times are then host
    /// times to enqueue, and expert_rows stays 0.
    ///
    /// dispatch: hidden [num_tokens, H] bf16, topk_ids [num_tokens, k] int32 (-1 = none; an id >= E is refused
    /// after routing, and the device router's offsets have then already advanced), topk_weights [num_tokens, k]
    /// float. The inputs are read in stream order (usual CUDA rules: a caller that frees or rewrites them on
    /// another stream must order that after `stream`).
    GpuDispatchHandle dispatch(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights,
                               int64_t num_tokens, int top_k, void* stream, int64_t first_token = 0);
    /// The same with int64 topk_ids (torch's index dtype), narrowed to int32 on `stream` by one kernel into the
    /// workspace (negative -> none; an id >= E is refused after routing and named with its int64 value).
    GpuDispatchHandle dispatch(const void* hidden_bf16, const int64_t* topk_ids, const float* topk_weights,
                               int64_t num_tokens, int top_k, void* stream, int64_t first_token = 0);
    /// Copies the open dispatch's received rows out: recv_x [R, H] bf16, recv_slot [R, k] int32 (local expert
    /// slot of each selection carried by the row, -1 elsewhere; flat carries one, in column 0), recv_weights
    /// [R, k] float (0 where recv_slot is -1). Row order is the order combine() expects partial rows in.
    void received(const GpuDispatchHandle& handle, void* recv_x_bf16, int32_t* recv_slot, float* recv_weights,
                  void* stream) const;
    /// Runs the layer's experts (its own or set_expert_weights' weights) on the open dispatch's received rows.
    void experts(GpuDispatchHandle& handle, void* stream);
    /// Sends one bf16 row per received row back (`expert_out_bf16` [R, H]; nullptr = the result of experts())
    /// and writes out [num_tokens, H] fp32. Consumes the handle. `stream` must be dispatch's.
    void combine(GpuDispatchHandle& handle, const void* expert_out_bf16, float* out, void* stream);
    /// dispatch + experts + combine: the same values as forward_device on the same inputs and router state.
    void forward_async(const void* hidden_bf16, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                       int top_k, float* out, void* stream, int64_t first_token = 0);
    /// The same with int64 topk_ids (see the int64 dispatch).
    void forward_async(const void* hidden_bf16, const int64_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                       int top_k, float* out, void* stream, int64_t first_token = 0);

    /// The one-GPU path of forward_async (one GPU holding every expert, scheme hsc or flat-dedup, no instance
    /// counting) maps ids to slots on the device and runs the local experts; its one host wait is the range check
    /// of the ids (an id >= E throws kInvalidArgument naming it). Off (`on` = false): that path waits for nothing
    /// on the host, so the caller's thread runs ahead of the GPU; an id >= E then selects no expert (as -1 does)
    /// and is not reported. For callers whose ids are a top-k over E logits. Every other path checks regardless.
    ///
    /// That path (one GPU, host id check off) can be captured in a CUDA graph: a call on a capturing stream
    /// queues kernels only. Its buffers must exist before the capture (an uncaptured call on this layer with at
    /// least as many tokens and the same top_k; otherwise kInvalidArgument before anything is queued, as for the
    /// cuBLAS GEMM fallback, which cannot be captured). A replay computes the captured num_tokens from whatever
    /// the captured input pointers hold then, ordered by the replay stream alone (no event orders it after calls
    /// on other streams that share the workspace). Buffers the graph uses stay allocated when later calls grow the
    /// workspace; keep the layer, its workspace and the weights alive while the graph may replay.
    /// last_dest_ranks() after a captured call throws kInvalidArgument (nothing is copied to the host).
    void set_host_id_check(bool on);

    /// Statistics of the last call (wall-clock seconds on this rank, each stage synchronized; bytes sent per
    /// link class with payload = copies * H * 2).
    const MoeCallStats& last_stats() const;
    /// Destination GPU of every selection of the last call, [num_tokens, k] (-1 for none). Throws
    /// kInvalidArgument when the last call was captured in a CUDA graph.
    const std::vector<int32_t>& last_dest_ranks() const;
    /// True when the last call routed on the device (WRR, TAR, primary).
    bool routed_on_device() const;
    /// Hidden size H.
    int hidden() const;

    /// Online adaptation (adaptation.hpp; wrr and tar, which route on the device). Counting on: the router kernel's
    /// per-instance counts of every call are summed on the device.
    void set_instance_counting(bool on);
    /// Adds the device-side counts since the last take to `counts` (flat [instances], instance_offsets order) and
    /// restarts them (one device synchronization).
    void take_instance_counts(std::vector<int64_t>& counts);
    /// New WRR weights [E][n_e]: the device table is re-uploaded asynchronously on the router's stream (the next
    /// call routes with it; nothing waits), the offsets carry over. Throws kInvalidArgument for another policy.
    void set_wrr_weights(const std::vector<std::vector<int>>& weights);

  private:
    void setup(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
               const std::vector<ExpertWeights>* local_experts, int hidden, int intermediate);
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace grace::cuda
