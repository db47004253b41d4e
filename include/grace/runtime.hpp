#pragma once
/// @file runtime.hpp
/// An expert-parallel MoE layer that runs for real over a Communicator (the CPU reference backend), in the
/// shape DeepEP's and Megatron's dispatcher users know: create it once from a plan's LayerPlan, the topology,
/// a communicator and the local expert weights, then per batch
/// `forward(hidden [T_local, H], topk_ids [T_local, k], topk_weights [T_local, k]) -> [T_local, H]`.
///
/// Inside forward: replica routing (ReplicaRouter, its WRR counters carried across calls), the dispatch
/// layout (num_tokens_per_rank, num_tokens_per_node deduplicated, is_token_in_rank), dispatch, the local
/// experts (SwiGLU), and combine, with one of three schemes (spec §6):
/// - kFlat: one copy per selection to the chosen GPU; combine returns one vector per selection.
/// - kFlatDedup: one copy per destination GPU; the destination sums its selections; one vector back.
/// - kHsc: stage 1 on the global communicator, each rank exchanging only with its peers (same local index on
///   other nodes; zero-sized elsewhere), non-blocking so that the intra-node layout is computed meanwhile;
///   stage 2 on the node communicator. Combine mirrors it: partial sums are reduced inside the destination
///   node at the peer first, then one vector per (token, node) goes back across.
/// A copy to the caller's own GPU is a local copy, not traffic. Wire payload is fp32 activations
/// (H * 4 bytes per copy); metadata (expert ids, destinations, gate weights) is counted separately, and so is
/// control traffic (the per-peer counts exchanged before each all-to-all).

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "grace/communicator.hpp"
#include "grace/eval.hpp"
#include "grace/experts.hpp"
#include "grace/plan.hpp"
#include "grace/routing.hpp"
#include "grace/topology.hpp"

namespace grace {

// CommScheme (flat, flat-dedup, 2dh, hsc), to_string and parse_comm_scheme come from eval.hpp, so that the
// runtime and the evaluator name schemes identically. The runtime executes flat, flat-dedup and hsc; 2dh is
// priced by the evaluator only (kUnsupported here).

/// Link classes of the declared topology.
enum class LinkClass { kIntraNode = 0, kCrossNode = 1 };

/// Bytes one rank sent over one link class, split by kind.
struct LinkBytes {
    int64_t payload = 0;   ///< token activations (copies x H x 4)
    int64_t metadata = 0;  ///< expert ids, destinations and gate weights sent with the copies
    int64_t control = 0;   ///< per-peer counts exchanged before each all-to-all
    int64_t copies = 0;    ///< token vectors (payload rows)
};

/// What one forward call did on this rank. Times are wall-clock seconds on this rank.
struct MoeCallStats {
    double routing_s = 0;   ///< replica routing of every selection
    double layout_s = 0;    ///< dispatch layout and packing of send buffers (HSC: includes the overlapped part)
    double dispatch_s = 0;  ///< dispatch communication (incl. waits) and unpacking
    double expert_s = 0;    ///< local SwiGLU experts
    double combine_s = 0;   ///< combine communication and reductions
    double total_s = 0;     ///< whole forward
    double overlap_s = 0;   ///< HSC: layout work done while stage 1 was in flight
    /// Bytes sent by this rank, [LinkClass]: dispatch and combine.
    std::array<LinkBytes, 2> dispatch{};
    std::array<LinkBytes, 2> combine{};
    /// [G]: dispatch token copies this rank sent to each GPU (all stages; its row of the evaluator's
    /// TrafficMatrix, spec §6).
    std::vector<int64_t> dispatch_copies_to;
    int64_t local_selections = 0;  ///< selections this rank routed (T_local * k)
    int64_t expert_rows = 0;       ///< (copy, expert) rows this rank's experts computed
};

/// DeepEP-style dispatch layout of one rank's tokens, given each selection's destination GPU.
struct DispatchLayout {
    std::vector<int> num_tokens_per_rank;    ///< [G]: tokens with at least one selection on GPU g
    std::vector<int> num_tokens_per_node;    ///< [N]: tokens with at least one selection on node n
    std::vector<int> num_tokens_per_expert;  ///< [E]: selections of expert e
    std::vector<uint8_t> is_token_in_rank;   ///< [T_local, G]: 1 if token t has a selection on GPU g
};

/// Computes the layout from dest_ranks [T_local, k] (GPU of each selection) and topk_ids [T_local, k].
/// Throws kInvalidArgument for a destination outside [0, G) or an expert outside [0, E).
DispatchLayout compute_dispatch_layout(const int32_t* dest_ranks, const int32_t* topk_ids, int64_t num_tokens,
                                       int top_k, int num_experts, const Topology& topology);

/// Options of a MoeLayer.
struct MoeLayerOptions {
    CommScheme scheme = CommScheme::kHsc;        ///< dispatch/combine scheme
    RoutingPolicy policy = RoutingPolicy::kTar;  ///< replica routing policy
    uint64_t routing_seed = 0;                   ///< seed of the SGLang policies
    bool overlap = true;                         ///< HSC: pack stage 2 while stage 1 is in flight
};

/// What MoeLayer::dispatch delivered to this rank: R rows, each carrying the selections served here. Own tokens
/// with a selection on this rank come first (token order), then the received copies in arrival order.
struct MoeReceived {
    int64_t rows = 0;            ///< R
    int top_k = 0;               ///< k
    std::vector<float> x;        ///< [R, H] token vectors
    std::vector<int32_t> topk;   ///< [R, k] local expert slot of each selection served here, -1 elsewhere
    std::vector<float> weights;  ///< [R, k] gate weight of each such selection, 0 where topk is -1
};

/// The state one MoeLayer::dispatch leaves for its combine (the exchange layouts, where each returned vector is
/// added). Opaque and move-only; valid for exactly one combine on the layer that made it.
class MoeHandle {
  public:
    MoeHandle();
    ~MoeHandle();
    MoeHandle(MoeHandle&&) noexcept;
    MoeHandle& operator=(MoeHandle&&) noexcept;
    /// False once combined (or default-constructed).
    bool valid() const { return state_ != nullptr; }
    /// T: tokens of the dispatch (rows of combine's output).
    int64_t num_tokens() const;
    /// R: rows dispatch delivered (rows of the expert output combine expects).
    int64_t num_rows() const;

  private:
    friend class MoeLayer;
    struct State;
    std::unique_ptr<State> state_;
};

/// The local experts on received rows: expert_out [rows, H] = sum_j weights[r, j] * SwiGLU_{slots[s]}(x[r]) over
/// the j with s = topk[r, j] >= 0 (-1 = none; rows without a selection give 0). Rows are batched per slot in row
/// order, slot by slot, and each row's terms are added in slot order: MoeLayer::forward's exact arithmetic.
/// `workspaces` is resized to slots.size(). Throws kInvalidArgument for a slot outside [-1, S) (naming row and
/// column) or a slot whose hidden size is not `hidden`.
void run_local_experts(const std::vector<ExpertWeightsView>& slots, int hidden, const float* x, const int32_t* topk,
                       const float* weights, int64_t rows, int top_k, float* expert_out,
                       std::vector<ExpertWorkspace>& workspaces);

/// One MoE layer on one rank.
/// Checks the flat sizes of a forward call and returns num_tokens: `topk_ids` and `topk_weights` hold
/// num_tokens * top_k values and `hidden` num_tokens * hidden_size. Throws kInvalidArgument naming the mismatch.
/// Shared by every layer backend.
int64_t forward_num_tokens(size_t hidden_values, size_t topk_ids, size_t topk_weights, int top_k, int hidden_size);

class MoeLayer {
  public:
    /// `layer` must be finalized (instance_gpus, wrr_weights) for `topology`; `communicator` must use the same
    /// topology and outlive the layer; `local_experts` must hold exactly the experts of
    /// layer.gpu_experts[communicator.rank()] (any order), all of one shape. Throws kInvalidArgument naming what
    /// is missing or inconsistent, kUnsupported for the 2dh scheme.
    MoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator,
             std::vector<ExpertWeights> local_experts, const MoeLayerOptions& options = {});
    ~MoeLayer();
    /// A layer without weights (the caller passes them to experts() each call): hidden size `hidden_size`
    /// (all ranks must agree); local slot s is expert layer.gpu_experts[communicator.rank()][s]. forward() and
    /// the weightless experts() throw kInvalidArgument on it.
    MoeLayer(const LayerPlan& layer, const Topology& topology, Communicator& communicator, int hidden_size,
             const MoeLayerOptions& options = {});
    MoeLayer(const MoeLayer&) = delete;
    MoeLayer& operator=(const MoeLayer&) = delete;

    /// Collective over all ranks (every rank must call it, with num_tokens = 0 if it has none).
    /// hidden [num_tokens, H], topk_ids [num_tokens, k] (expert ids; -1 = no selection), topk_weights
    /// [num_tokens, k]; writes out [num_tokens, H] = sum_j w_j * expert_{e_j}(hidden). `first_token` is the
    /// global flat index of this rank's first token in the replayed stream; the first call's is taken as the
    /// rank's first token, so the engine policies (vllm, trtllm, sglang-dynamic) see per-rank token indices, as
    /// the evaluator does. Throws kInvalidArgument for bad ids/shapes, kBackend.
    void forward(const float* hidden, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens, int top_k,
                 float* out, int64_t first_token = 0);
    /// Vector form: returns [num_tokens, H].
    std::vector<float> forward(const std::vector<float>& hidden, const std::vector<int32_t>& topk_ids,
                               const std::vector<float>& topk_weights, int top_k, int64_t first_token = 0);

    /// forward() in three phases, DeepEP-style: forward == combine(experts(dispatch(...))) bit for bit.
    /// dispatch: collective (every rank calls it); routes every selection (ReplicaRouter, counters carried),
    /// exchanges the copies and returns the rows served here in `received` (with this rank's local slots: the
    /// index into the local_experts given to the constructor, or into layer.gpu_experts[rank] for a weightless
    /// layer). Arguments and errors as forward. `hidden` is not referenced after it returns.
    MoeHandle dispatch(const float* hidden, const int32_t* topk_ids, const float* topk_weights, int64_t num_tokens,
                       int top_k, MoeReceived& received, int64_t first_token = 0);
    /// Local, no communication: expert_out [R, H] from the layer's own weights (run_local_experts).
    void experts(const MoeReceived& received, float* expert_out);
    /// The same with the caller's weights: slots[s] for local slot s (as many as the layer's local experts, of
    /// hidden size H; else kInvalidArgument).
    void experts(const std::vector<ExpertWeightsView>& slots, const float* recv_x, const int32_t* recv_topk,
                 const float* recv_weights, int64_t rows, int top_k, float* expert_out);
    /// Collective: sends each row's expert output back to its token and writes out [T, H] (T = handle's
    /// num_tokens()) = the sum over every selection of the token. expert_out is [handle.num_rows(), H]. Consumes
    /// the handle; throws kInvalidArgument for an empty (already combined) handle or one of another layer.
    void combine(const float* expert_out, MoeHandle& handle, float* out);
    /// Number of local expert slots (experts of layer.gpu_experts[rank]).
    int num_local_experts() const;

    /// Statistics of the last forward call (phases: the last dispatch, experts and combine; total_s then runs
    /// from dispatch's start to combine's end, including the caller's time between the phases).
    const MoeCallStats& last_stats() const;
    /// Layout of the last forward call.
    const DispatchLayout& last_layout() const;
    /// Destination GPU of every selection of the last call, [num_tokens, k] (-1 for no selection).
    const std::vector<int32_t>& last_dest_ranks() const;
    /// The replica router (its WRR counters persist across calls).
    ReplicaRouter& router();
    /// Hidden size H.
    int hidden() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// Exchanges plan_hash(plan) between all ranks; throws kInvalidInput listing the ranks whose plan differs
/// from rank 0's (every rank throws the same message).
void check_same_plan(Communicator& communicator, const ExpertPlan& plan);

}  // namespace grace
