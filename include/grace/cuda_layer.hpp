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

/// Options of a GpuMoeLayer.
struct GpuMoeLayerOptions {
    CommScheme scheme = CommScheme::kHsc;                   ///< dispatch/combine scheme
    RoutingPolicy policy = RoutingPolicy::kTar;             ///< replica routing policy
    uint64_t routing_seed = 0;                              ///< seed of the SGLang policies
    GroupedGemmBackend gemm = GroupedGemmBackend::kAuto;    ///< LocalMoe GEMM backend
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

    /// Statistics of the last call (wall-clock seconds on this rank, each stage synchronized; bytes sent per
    /// link class with payload = copies * H * 2).
    const MoeCallStats& last_stats() const;
    /// Destination GPU of every selection of the last call, [num_tokens, k] (-1 for none).
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
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace grace::cuda
