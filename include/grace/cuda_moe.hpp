#pragma once
/// @file cuda_moe.hpp
/// The GPU backend's local MoE compute (spec §5 routing, §6 dispatch layout), behind a CUDA-free API: device
/// buffers are passed as typed pointers, streams as `void*` (a cudaStream_t; nullptr = the legacy stream).
/// Built only with GRACE_USE_CUDA; the library is `grace_cuda`. Every CUDA, cuBLAS or NCCL failure throws
/// grace::Error(kBackend) naming the call, file and line.
///
/// Vocabulary follows DeepEP: `num_tokens`, `top_k`, `topk_idx` ([num_tokens, top_k] int32, -1 = masked),
/// `topk_weights`, `num_tokens_per_rank` ([G]), `is_token_in_rank` ([num_tokens, G]).
/// bf16 values on the host are raw bit patterns in uint16_t.

#include <cstdint>
#include <memory>
#include <vector>

namespace grace {
struct LayerPlan;          // grace/plan.hpp
struct Topology;           // grace/topology.hpp
enum class RoutingPolicy;  // grace/plan.hpp
}  // namespace grace

namespace grace::cuda {

/// True when a CUDA device is usable (cudaGetDeviceCount succeeds and returns >= 1).
bool device_available();
/// True when the current device can run GroupedGemmBackend::kSm90 (compute capability 9.0).
bool sm90_gemm_available();

/// The flat routing table the GPU router consumes; it can be filled from the CPU router's sequences or by
/// build_route_table below.
struct RouteTable {
    int num_sources = 0;  ///< G: source GPUs
    int num_experts = 0;  ///< E
    int period = 0;       ///< Q
    /// [num_sources * E][Q]: for (source s, expert e), the instance index (position in e's instance list)
    /// taken by the selection at sequence position q.
    std::vector<int32_t> sequence;
    /// [E + 1]: CSR offsets of each expert's instances in instance_gpu.
    std::vector<int32_t> instance_ptr;
    /// [num_instances]: the GPU of each instance, expert-major, primary first (LayerPlan::instance_gpus).
    std::vector<int32_t> instance_gpu;

    /// Throws kInvalidArgument naming the first inconsistency (sizes, indices out of range).
    void validate() const;
};

/// Builds the table for `policy` (kPrimary, kWrr or kTar; others throw kUnsupported) from a finalized layer.
/// The WRR and TAR sequences are the CPU grace::ReplicaRouter's own (ReplicaRouter::flat_sequences), so the
/// device picks exactly what the host picks; primary is instance 0 always.
RouteTable build_route_table(const LayerPlan& layer, const Topology& topology, RoutingPolicy policy);

/// Device outputs of GpuReplicaRouter::route; all pointers are device memory sized as noted.
struct RouteOutputs {
    int32_t* topk_instance = nullptr;        ///< [num_tokens, top_k]: instance index in the expert's list, -1 masked
    int32_t* topk_rank = nullptr;            ///< [num_tokens, top_k]: destination GPU, -1 masked
    int32_t* num_tokens_per_rank = nullptr;  ///< [G]: tokens with at least one selection on each GPU
    bool* is_token_in_rank = nullptr;        ///< [num_tokens, G]
    int32_t* num_tokens_per_instance = nullptr;  ///< [num_instances]: selections per instance (CSR order)
};

/// Host copy of a routing result (for tests and tools).
struct RouteResult {
    std::vector<int32_t> topk_instance, topk_rank, num_tokens_per_rank, num_tokens_per_instance;
    std::vector<uint8_t> is_token_in_rank;
};

/// Replica routing on the GPU, identical to the CPU reference: the i-th selection of expert e from source s
/// in this batch (token order, then j order) takes sequence position (offset[s,e] + i) mod Q; the offsets
/// carry across batches. Not thread-safe; calls on one router must be ordered on one stream.
class GpuReplicaRouter {
  public:
    /// Uploads `table` (validated) to the current device.
    explicit GpuReplicaRouter(const RouteTable& table);
    ~GpuReplicaRouter();
    GpuReplicaRouter(const GpuReplicaRouter&) = delete;
    GpuReplicaRouter& operator=(const GpuReplicaRouter&) = delete;

    /// Routes a batch of `num_tokens` tokens of source GPU `source`. `topk_idx` is device [num_tokens, top_k];
    /// outputs as in RouteOutputs (all required). Asynchronous on `stream`.
    void route(int source, const int32_t* topk_idx, int num_tokens, int top_k, const RouteOutputs& out,
               void* stream = nullptr);
    /// Synchronous host convenience wrapper around route().
    RouteResult route_host(int source, const std::vector<int32_t>& topk_idx, int num_tokens, int top_k);
    /// [G * E] current offsets (synchronizes the device).
    std::vector<int32_t> offsets() const;
    /// Sets every offset back to 0.
    void reset();
    /// Online adaptation (adaptation.hpp): replaces the sequence table ([num_sources * E][Q], as
    /// RouteTable::sequence, checked against the instance lists) by an asynchronous upload on `stream`. Batches
    /// routed on that stream before the call use the old table, later ones the new; nothing waits and the offsets
    /// stay. Throws kInvalidArgument for a table of the wrong size or an instance index out of range.
    void set_sequences(const std::vector<int32_t>& sequence, void* stream = nullptr);
    /// From now on (on) every route() adds its num_tokens_per_instance to a device-side int64 total.
    void set_count_accumulation(bool on);
    /// The device-side totals [num_instances] (CSR order) since the last take (synchronizes the device), then
    /// restarts them at zero. Zeros when accumulation is off.
    std::vector<int64_t> take_counts();
    int num_ranks() const;
    int num_instances() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// How the expert GEMMs are run.
enum class GroupedGemmBackend {
    kCublasGrouped,  ///< one cublasGemmGroupedBatchedEx per projection (CUDA 12.5+)
    kCublasLoop,     ///< one cublasGemmEx per non-empty expert per projection
    kHybrid,         ///< experts with >= hybrid_threshold rows: own cublasGemmEx; the rest: one grouped call
    /// Our own grouped GEMM (wgmma + TMA, one launch per projection over all experts, SiLU*up fused into the
    /// gate+up GEMM): reads the expert offsets on the device, so forward() never waits for the host. Needs a
    /// compute capability 9.0 GPU (H100/H200) and intermediate % 128 == 0.
    kSm90,
    kAuto,  ///< kSm90 where it can run, kHybrid elsewhere (resolved when the LocalMoe is built)
};

/// Shape of the local expert layer.
struct LocalMoeShape {
    int num_experts = 0;   ///< local expert instances E_local
    int top_k = 0;         ///< selections per token k
    int hidden = 0;        ///< H (multiple of 8)
    int intermediate = 0;  ///< I (multiple of 8)
};

/// Time of each stage of the last forward() (filled only when profiling is on), milliseconds.
struct LocalMoeTimings {
    float sort_ms = 0;       ///< counting sort by expert + positions (+ counts to the host, async)
    float permute_ms = 0;    ///< the row copy into expert order
    float gemm_up_ms = 0;    ///< grouped gate+up GEMM (includes the host sync for the counts)
    float act_ms = 0;        ///< SiLU(gate) * up
    float gemm_down_ms = 0;  ///< grouped down GEMM
    float unpermute_ms = 0;  ///< gate-weighted sum back into token order
    float total_ms = 0;      ///< all of the above
};

/// The local expert layer: permute tokens into per-expert contiguous rows, grouped GEMM gate+up ([H -> 2I],
/// rows [0, I) of W13 are the gate, [I, 2I) the up projection), SiLU(gate) * up, grouped GEMM down
/// ([I -> H]), un-permute with the gate-weighted sum into [num_tokens, H]. bf16 storage, fp32 accumulation.
class LocalMoe {
  public:
    /// Allocates workspace for up to `max_tokens` tokens on the current device. Throws kInvalidArgument for a bad
    /// shape and kUnsupported for kSm90 where it cannot run (see GroupedGemmBackend).
    LocalMoe(const LocalMoeShape& shape, int max_tokens, GroupedGemmBackend backend = GroupedGemmBackend::kAuto);
    ~LocalMoe();
    LocalMoe(const LocalMoe&) = delete;
    LocalMoe& operator=(const LocalMoe&) = delete;

    /// Device bf16 weights: w13 [E, 2I, H] and w2 [E, H, I] (row-major, nn.Linear layout). Not copied.
    void set_weights(const void* w13, const void* w2);
    /// out [T, H] bf16 = sum_j topk_weights[t, j] * expert_{topk_idx[t, j]}(x[t]). x, out: device bf16;
    /// topk_idx: device int32 [T, k] in [0, E) or -1; topk_weights: device float [T, k]. The cuBLAS backends
    /// synchronize the stream once (they need the per-expert counts on the host for the GEMM shapes); kSm90 is
    /// asynchronous throughout. x and out must start on 16-byte boundaries (kInvalidArgument otherwise).
    /// CUDA graphs: with kSm90 a call on a capturing stream is captured (kernels only; that call's counts are then
    /// not read back, so last_counts() throws kInvalidArgument until the next uncaptured forward); the cuBLAS
    /// backends and profiling refuse it (kInvalidArgument). The graph holds this LocalMoe's workspace and the
    /// pointers it was given: keep them alive, and num_tokens is fixed, while it may replay.
    void forward(const void* x, const int32_t* topk_idx, const float* topk_weights, void* out, int num_tokens,
                 void* stream = nullptr);
    /// forward() writing out [T, H] as float32: each sum is rounded to bf16 first, so out holds exactly the
    /// widened values of forward()'s bf16 output, without a second pass over them.
    void forward_f32(const void* x, const int32_t* topk_idx, const float* topk_weights, float* out, int num_tokens,
                     void* stream = nullptr);
    /// Host convenience wrapper (uploads weights and inputs, runs forward, downloads out).
    static std::vector<uint16_t> forward_host(const LocalMoeShape& shape, GroupedGemmBackend backend,
                                              const std::vector<uint16_t>& w13, const std::vector<uint16_t>& w2,
                                              const std::vector<uint16_t>& x, const std::vector<int32_t>& topk_idx,
                                              const std::vector<float>& topk_weights, int num_tokens,
                                              int hybrid_threshold = 512);
    /// Re-runs the expert part of the last forward (up GEMM, SiLU*up if `with_activation`, down GEMM) on its
    /// workspace, with no host synchronization: for timing the grouped GEMMs alone. kSm90 always runs SiLU*up
    /// (it is fused into the up GEMM's epilogue).
    void rerun_experts(void* stream = nullptr, bool with_activation = true);
    /// Records per-stage events when on (adds synchronizations; for benchmarks).
    void set_profiling(bool on);
    const LocalMoeTimings& last_timings() const;
    /// [E] tokens per expert of the last forward (host copy; with kSm90 the first call after a forward waits for
    /// that forward's counts to arrive). Throws kInvalidArgument when the last forward was captured in a graph.
    const std::vector<int32_t>& last_counts() const;
    /// The backend in use (kAuto resolved).
    GroupedGemmBackend backend() const;
    /// Rows from which kHybrid gives an expert its own GEMM (default 512: in a side-by-side sweep of 64..2048 on
    /// an H100 it was the best or within 3% of the best cut-off at both model shapes and T = 2048..16384; see
    /// bench/results/gpu.md).
    void set_hybrid_threshold(int rows);
    /// Switches the backend (kAuto is resolved; kSm90 where it cannot run throws kUnsupported).
    void set_backend(GroupedGemmBackend backend);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// bf16 <-> float on the host (round to nearest even).
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t h);

}  // namespace grace::cuda
