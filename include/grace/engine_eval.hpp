#pragma once
/// @file engine_eval.hpp
/// What a serving engine does with an exported plan: `grace export`'s physical map (padding included) is the
/// placement the engine loads, and the engine's own replica choice (engine_routing.hpp) routes over its slots.
/// `grace eval --engine` and `grace compare --engine` replay a trace through that deployment and price it with
/// the same cost model and report as `grace eval`.

#include <string>
#include <vector>

#include "grace/engine_routing.hpp"
#include "grace/export.hpp"
#include "grace/plan.hpp"

namespace grace {

/// A serving engine that loads GRACE exports.
enum class Engine { kSglang, kVllm, kVllmAscend, kTrtllm };

/// "sglang", "vllm", "vllm-ascend", "trtllm".
std::string to_string(Engine engine);
/// Inverse of to_string; throws kInvalidArgument listing the valid names.
Engine parse_engine(const std::string& name);
/// The replica choice the engine runs with the export loaded: sglang-static (SGLang's default dispatch with
/// `--init-expert-location`), vllm, vllm-ascend, trtllm.
RoutingPolicy engine_policy(Engine engine);
/// Throws kInvalidArgument unless the engine can run `policy` (SGLang: sglang-static, sglang-nearest,
/// sglang-dynamic; the others: their own rule only).
void check_engine_policy(Engine engine, RoutingPolicy policy);

/// A plan as an engine holds it.
struct EngineDeployment {
    PhysicalMap map;  ///< what `grace export` writes: slot p of layer l holds map.phy2log[l * P + p], on GPU p / S
    /// The placement as a plan: GPU g holds the experts of its slots (two slots of one expert on one GPU are one
    /// instance), primary = the GPU of the expert's first slot, every layer's policy = the engine's rule.
    ExpertPlan plan;
    /// [layer_offset + L]: the physical slots, for ReplayOptions::slot_maps; the leading ones are the trivial rows
    /// (slot p holds expert p mod E) that the SGLang export gives the model's dense layers.
    std::vector<SlotMap> slot_maps;
};

/// Builds the deployment of `plan` under `policy` (an engine policy): build_physical_map(plan, expert_load,
/// slots_per_gpu), then the plan and slot maps above. `layer_offset` (grace export --layer-offset) matters to
/// SGLang's static dispatch only: its random stream runs over the dense layers' rows first. Throws as
/// build_physical_map, kInvalidArgument for a non-engine policy or a negative offset.
EngineDeployment deploy_to_engine(const ExpertPlan& plan, RoutingPolicy policy,
                                  const std::vector<double>& expert_load = {}, int slots_per_gpu = 0,
                                  int layer_offset = 0);

}  // namespace grace
