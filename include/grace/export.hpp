#pragma once
/// @file export.hpp
/// `grace export`: a grace.plan/v1 plan -> the placement files serving engines load (spec §9; formats in
/// docs/formats.md, section "Exports").
///
/// Every engine needs the same number of slots on every GPU: a plan whose GPUs hold different numbers of
/// instances is padded (pad_to_equal_slots) with the most useful extra replicas (highest load per instance
/// among the experts a GPU lacks), never with a second instance of an expert on one GPU. Physical slot
/// p = g * S + i is the i-th expert (ascending id) held by GPU g.

#include <cstdint>
#include <string>
#include <vector>

#include "grace/plan.hpp"

namespace grace {

/// Target engine format.
enum class ExportFormat {
    kSglang,      ///< SGLang `--init-expert-location` JSON: {"physical_to_logical_map": [L][P]}
    kVllmAscend,  ///< vLLM-Ascend expert map JSON: moe_layer_count, layer_list[].device_list[].device_expert
    kTrtllm,      ///< TensorRT-LLM MoeLoadBalancerConfig YAML: initial_global_assignments, num_slots
    kEplb,        ///< DeepSeek EPLB triple phy2log [L,P], log2phy [L,E,X] (-1 padded), logcnt [L,E]
};

/// "sglang", "vllm-ascend", "trtllm", "eplb".
std::string to_string(ExportFormat format);
/// Inverse of to_string; throws kInvalidArgument listing the valid names.
ExportFormat parse_export_format(const std::string& name);

/// Equal-slot placement of every layer.
struct PhysicalMap {
    int num_layers = 0;        ///< L
    int num_experts = 0;       ///< E
    int num_gpus = 0;          ///< G
    int slots_per_gpu = 0;     ///< S' (the same for all layers: the largest instance count of any GPU and layer)
    int num_padded = 0;        ///< padding replicas added over all layers
    std::vector<int> phy2log;  ///< [L, G * S']: logical expert of each physical slot
    int num_physical() const { return num_gpus * slots_per_gpu; }
};

/// Builds the equal-slot map. `expert_load` is [L, E] (tokens), used to choose padding replicas; empty means
/// estimate each expert's load as its primary GPU's predicted load divided by that GPU's instance count (the
/// plan stores no per-expert loads). `slots_per_gpu` > 0 asks for exactly that many slots per GPU (an engine's
/// (E + redundant) / G); 0 = the largest instance count of any GPU and layer. Throws kInvalidArgument if
/// `expert_load` has the wrong size, or the plan holds more instances on a GPU than `slots_per_gpu`, or
/// `slots_per_gpu` exceeds E.
PhysicalMap build_physical_map(const ExpertPlan& plan, const std::vector<double>& expert_load = {},
                               int slots_per_gpu = 0);

/// Largest ExportOptions::layer_offset: a model layer index (the deepest models have a few hundred layers); the
/// SGLang export writes one row per offset layer, so the bound also bounds its size.
inline constexpr int kMaxLayerOffset = 10000;

/// Options of export_plan.
struct ExportOptions {
    ExportFormat format = ExportFormat::kSglang;
    /// Model layer index of MoE layer 0 (models with leading dense layers, e.g. 3 for DeepSeek-V3): TensorRT-LLM
    /// keys become l + offset; SGLang gets `offset` leading rows of the trivial map (p mod E) for the dense
    /// layers. vLLM-Ascend and EPLB count MoE layers only and ignore it. In [0, kMaxLayerOffset], else
    /// export_text / export_plan throw kInvalidArgument.
    int layer_offset = 0;
    std::vector<double> expert_load;  ///< [L, E] or empty; see build_physical_map
};

/// Text of the export (JSON or YAML). For kEplb: JSON {"phy2log", "log2phy", "logcnt"}.
std::string export_text(const PhysicalMap& map, const ExportOptions& options);

/// Writes the export atomically to `path`. For kEplb, a path not ending in ".json" is a folder written with
/// phy2log.npy, log2phy.npy, logcnt.npy (int64), a grace "eplb-export" folder output (write_dir_atomic,
/// grace/io.hpp). Returns the map written. Throws kIo for a missing parent folder or a folder it may not replace.
PhysicalMap export_plan(const ExpertPlan& plan, const ExportOptions& options, const std::string& path);

/// Reads an export back into [L][G][*] experts per GPU (slot order), for checks and round trips; `num_gpus`
/// splits the physical slots (the formats other than vLLM-Ascend do not record G). Throws kInvalidInput for a
/// malformed file.
std::vector<std::vector<std::vector<int>>> read_export(const std::string& path, ExportFormat format, int num_gpus,
                                                       int layer_offset = 0);

}  // namespace grace
