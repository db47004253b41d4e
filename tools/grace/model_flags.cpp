#include "model_flags.hpp"

namespace grace::cli {

void add_model_config_flag(CLI::App& sub, std::string& path) {
    sub.add_option("--model-config", path,
                   "Hugging Face config.json of the model (hidden, expert intermediate size, experts, top-k, MoE "
                   "layers; docs/models.md); its experts and MoE layers must match the trace");
}

std::optional<ModelConfig> explicit_model(const std::string& config_path,
                                          const std::optional<std::string>& model_flag) {
    if (!config_path.empty()) return load_model_config(config_path);
    if (model_flag)
        if (const ModelConfig* preset = find_model_config_preset(*model_flag)) return *preset;
    return std::nullopt;
}

}  // namespace grace::cli
