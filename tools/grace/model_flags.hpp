#pragma once
// --model-config and --model NAME on the commands that price or run a model (eval, compare, run).

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "grace/model_config.hpp"

namespace grace::cli {

/// Adds --model-config PATH (a Hugging Face config.json) to `sub`.
void add_model_config_flag(CLI::App& sub, std::string& path);

/// The model the user chose explicitly: the config at `config_path` if non-empty, else the preset `model_flag`
/// names (--model) if it is one, else nullopt (the trace's metadata names the model, or --model names no preset).
/// Throws as load_model_config.
std::optional<ModelConfig> explicit_model(const std::string& config_path, const std::optional<std::string>& model_flag);

}  // namespace grace::cli
