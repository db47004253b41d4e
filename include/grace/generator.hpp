#pragma once
/// @file generator.hpp
/// Synthetic routing traces at real model shapes (spec §10), calibrated against real routing statistics
/// (docs/calibration.md). Tokens carry latent topics: each topic prefers a subset of experts; a token draws
/// its k experts without replacement (Gumbel top-k) from popularity x topic preference; topic frequencies are
/// Zipf-like; a token's topic persists across layers and within a sequence. Named datasets shift the topic
/// mixture and the popularity. Seeded and deterministic (independent of the thread count).

#include <cstdint>
#include <string>
#include <vector>

#include "grace/trace.hpp"

namespace grace {

/// Shape of a model preset.
struct ModelPreset {
    std::string name;        ///< "olmoe", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral", "gpt-oss-20b"
    int num_experts = 0;     ///< E (routed)
    int top_k = 0;           ///< k
    int num_layers = 0;      ///< L (MoE layers)
    int hidden = 0;          ///< H
    int intermediate = 0;    ///< I (per expert)
    int shared_experts = 0;  ///< not routed; informational
};

/// The presets, in a fixed order.
const std::vector<ModelPreset>& model_presets();
/// Looks a preset up by name; throws kInvalidArgument listing the known names.
const ModelPreset& find_preset(const std::string& name);
/// The named datasets the generator knows ("wikitext", "arxiv", "github", "c4", "mixed", ...).
const std::vector<std::string>& generator_datasets();

/// Generator options. Defaults give a wikitext-like olmoe trace.
struct GeneratorOptions {
    std::string preset = "olmoe";
    std::string dataset = "wikitext";
    int64_t num_tokens = 16384;
    uint64_t seed = 0;
    int num_layers = 0;         ///< 0 = the preset's
    int sequence_length = 512;  ///< tokens per sequence (topic burstiness)
    bool with_weights = true;   ///< also produce softmax gate weights
    int num_threads = 0;        ///< 0 = all
    /// How far datasets of one model drift apart: the weight of the dataset-specific part of the expert
    /// popularity and of the topic mixture, in [0, 1] (0: every dataset routes alike; 1: independent hot
    /// experts). Negative = the preset's value (docs/calibration.md).
    double domain_shift = -1;
};

/// Generates a trace. Throws kInvalidArgument for an unknown preset/dataset, num_tokens < 1 or domain_shift > 1.
RoutingTrace generate_trace(const GeneratorOptions& options);

}  // namespace grace
