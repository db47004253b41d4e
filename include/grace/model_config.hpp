#pragma once
/// @file model_config.hpp
/// MoE model shapes read from a Hugging Face `config.json`, and the shipped model presets (docs/models.md).
///
/// The reader maps each architecture's field names onto one shape (per `model_type`; docs/models.md has the table):
/// - qwen2_moe, qwen3_moe: I = moe_intermediate_size, E = num_experts, k = num_experts_per_tok; decoder layer l
///   is MoE iff l is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0;
/// - deepseek_v2, deepseek_v3: I = moe_intermediate_size, E = n_routed_experts, k = num_experts_per_tok; layer l
///   is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0;
/// - mixtral, gpt_oss: I = intermediate_size, E = num_local_experts, k = num_experts_per_tok (gpt_oss: or
///   experts_per_token); every layer is MoE;
/// - olmoe: I = intermediate_size, E = num_experts, k = num_experts_per_tok; every layer is MoE.
///
/// H is `hidden_size` and the decoder depth `num_hidden_layers` for all of them; `torch_dtype` (or `dtype`) gives
/// the checkpoint's bytes per element when present. Shared experts are not read: the cost model has no term for
/// them. A missing `model_type` is taken from `architectures[0]`.

#include <cstdint>
#include <string>
#include <vector>

namespace grace {

/// The MoE shape of one model.
struct ModelConfig {
    std::string name;             ///< preset name, or the path of the config file it was read from
    std::string model_type;       ///< Hugging Face model_type ("qwen2_moe", "deepseek_v3", "mixtral", ...)
    int hidden = 0;               ///< H (hidden_size)
    int intermediate = 0;         ///< I of one routed expert
    int num_experts = 0;          ///< E, routed experts per MoE layer
    int top_k = 0;                ///< k, routed experts per token
    int num_hidden_layers = 0;    ///< decoder layers, dense and MoE
    std::vector<int> moe_layers;  ///< decoder-layer index of each MoE layer, ascending; [L] with L >= 1
    std::string dtype;            ///< torch_dtype as written ("bfloat16", ...); empty if the file has none
    int dtype_bytes = 0;          ///< bytes per element of dtype; 0 if none

    /// L, the number of MoE layers (what a routing trace records).
    int num_moe_layers() const { return static_cast<int>(moe_layers.size()); }
};

/// Parses a Hugging Face config.json. `origin` names the file in errors and becomes `name`. Throws kInvalidInput
/// with one line naming the field and `origin`: invalid JSON, unsupported model_type, a missing field, a value
/// that is not an integer or is out of range (sizes and counts must be positive and fit in int), top-k > experts,
/// an mlp_only_layers entry outside [0, num_hidden_layers), no MoE layer at all, an unknown torch_dtype, or two
/// spellings of one field (experts_per_token / num_experts_per_tok, torch_dtype / dtype) that disagree.
ModelConfig parse_model_config(const std::string& json_text, const std::string& origin);

/// Reads and parses a config.json file. Throws kIo if it cannot be read, else as parse_model_config.
ModelConfig load_model_config(const std::string& path);

/// Names of the shipped presets (src/sim/presets/models/*.json), sorted; aliases not included.
const std::vector<std::string>& model_config_presets();

/// The preset `name` (or one of its aliases, e.g. "deepseek-r1" for "deepseek-v3"), or nullptr if none.
const ModelConfig* find_model_config_preset(const std::string& name);

/// The preset `name`; throws kInvalidArgument listing the known names if there is none.
const ModelConfig& model_config_preset(const std::string& name);

}  // namespace grace
