#pragma once
/// @file plan.hpp
/// The expert placement plan, `grace.plan/v1` (spec §9): per layer, which experts each GPU holds (primaries
/// and replicas), each expert's primary GPU, and the routing table. Plans are immutable once built: the
/// planner emits one, the evaluator and the runtime consume it (flashinfer's plan/run split).

#include <cstdint>
#include <string>
#include <vector>

#include "grace/topology.hpp"

namespace grace {

/// How a token's selection of expert e is sent to one of e's instances (spec §5). The values from kVllm on are
/// the serving engines' own replica choice, as their code does it (engine_routing.hpp, docs/deploy.md).
enum class RoutingPolicy {
    kPrimary,        ///< always the primary instance
    kWrr,            ///< smooth weighted round-robin over all instances, weights from load prediction
    kTar,            ///< topology-aware: same GPU, else same node, else any; WRR inside the tier
    kVllm,           ///< vLLM: slot ((local token * 2654435769) mod 2^32) mod replica count
    kSglangStatic,   ///< SGLang legacy static: same-GPU slot, else _fair_choices with random.Random(42), per rank
    kSglangDynamic,  ///< SGLang dynamic: uniform random slot per selection (seeded)
    kSglangNearest,  ///< SGLang newer static (_find_nearest_expert): same GPU, else same node, else fair choices
    kVllmAscend,     ///< vLLM-Ascend: rank r takes the (r mod n)-th holder of the expert
    kTrtllm,         ///< TensorRT-LLM: per-rank round-robin over the expert's slots in 1024-selection blocks
};

/// "primary", "wrr", "tar", "vllm", "sglang-static", "sglang-dynamic", "sglang-nearest", "vllm-ascend", "trtllm".
std::string to_string(RoutingPolicy policy);
/// Inverse of to_string; throws kInvalidArgument listing the valid names.
RoutingPolicy parse_routing_policy(const std::string& name);

/// One point of the U/D knee curve (spec §3).
struct KneePoint {
    double r = 0;  ///< non-uniformity ratio
    double u = 0;  ///< intra-group affinity utilization U(P_r), Equation 1
    double d = 0;  ///< size deviation D(P_r), Equation 2
};

/// The plan of one MoE layer.
struct LayerPlan {
    int layer = 0;
    /// [G][n_g]: expert ids held by GPU g (primaries and replicas), ascending. A slot's physical index is its
    /// position in the concatenation over GPUs (slots contiguous per GPU).
    std::vector<std::vector<int>> gpu_experts;
    /// [E]: the GPU holding expert e's primary instance.
    std::vector<int> primary_gpu;
    /// [E][n_e]: GPUs of e's instances, primary first, then replicas by ascending GPU. Derived from the two
    /// fields above by finalize().
    std::vector<std::vector<int>> instance_gpus;
    /// [E][n_e]: integer WRR weights of e's instances (same order as instance_gpus), each >= 1, summing to
    /// wrr_period. Empty means uniform (finalize() fills them).
    std::vector<std::vector<int>> wrr_weights;
    RoutingPolicy policy = RoutingPolicy::kPrimary;  ///< default policy for this layer
    int wrr_period = 120;                            ///< Q

    // Diagnostics the planner records (optional; absent = empty / NaN / -1).
    double r_star = -1;                               ///< chosen non-uniformity ratio (per node: mean) or -1
    std::vector<std::vector<KneePoint>> knee_curves;  ///< [N][points]: U/D curve of each node's GPU grouping
    double gamma = 0;                                 ///< load skew L_max / L_mean after grouping
    int num_replicas = 0;                             ///< R, Equation 3
    std::vector<int> hot_experts;                     ///< replicated experts
    int num_fill_replicas = 0;                        ///< replicas added to fill free slots (slot-exact plans)
    int num_priced_moves = 0;                         ///< slot rewrites of the priced refinement (slot-exact plans)
    std::vector<double> predicted_gpu_load;           ///< [G]: Equation 4 load prediction (tokens)
    std::vector<double> gpu_load_before;              ///< [G]: load per GPU after grouping, before replication

    /// Number of instances (physical slots) in this layer.
    int num_instances() const;
    /// Fills instance_gpus from gpu_experts/primary_gpu, and uniform wrr_weights where missing.
    void finalize(int num_experts);
};

/// A whole plan.
struct ExpertPlan {
    int num_experts = 0;  ///< E
    int num_layers = 0;   ///< L
    int top_k = 0;        ///< k
    Topology topology;
    std::string method;  ///< the method spec it was made with, e.g. "hierarchical+dynamic+tar"
    uint64_t seed = 0;
    std::string source;  ///< what it was planned from (stats folder or trace), free text
    std::vector<LayerPlan> layers;

    /// Checks every constraint and throws kInvalidInput naming the first violation: shapes, ids in range,
    /// every expert has an instance, its primary is among them, no GPU holds an expert twice, slot
    /// capacity, WRR weights positive summing to the period.
    void validate() const;
};

/// Serializes to `grace.plan/v1` JSON. Deterministic: the same plan gives the same bytes.
std::string plan_to_json(const ExpertPlan& plan);
/// Parses and validates `grace.plan/v1` JSON; throws kInvalidInput naming the missing or bad field.
ExpertPlan plan_from_json(const std::string& json_text);
/// Atomic write / read of a plan file.
void save_plan(const ExpertPlan& plan, const std::string& path);
ExpertPlan load_plan(const std::string& path);
/// 64-bit FNV-1a hash of plan_to_json(plan): ranks compare it at start-up.
uint64_t plan_hash(const ExpertPlan& plan);

}  // namespace grace
