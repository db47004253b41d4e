#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/model_config.hpp"

namespace grace {

ModelShape resolve_model_shape(const HardwareModel& hw, const std::string& model) {
    ModelShape s;
    s.model = model;
    s.hidden = hw.hidden;
    s.intermediate = hw.intermediate;
    if (s.hidden > 0 && s.intermediate > 0) return s;
    const ModelConfig* preset = find_model_config_preset(model);
    if (!preset) {
        std::string names;
        for (const auto& n : model_config_presets()) names += (names.empty() ? "" : ", ") + n;
        // No command-line flags here: callers differ in what they accept (eval adds its --hidden/--intermediate).
        GRACE_CHECK_ARG(false, "model '", model, "' has no preset (", names,
                        "): name one as the trace's model, give the model's config.json where the command takes "
                        "--model-config, or give \"hidden\" and \"intermediate\" in the hardware file");
    }
    if (s.hidden <= 0) s.hidden = preset->hidden;
    if (s.intermediate <= 0) s.intermediate = preset->intermediate;
    return s;
}

ModelShape explicit_model_shape(const HardwareModel& hw, const ModelConfig& config) {
    GRACE_CHECK_ARG(hw.hidden <= 0 || hw.hidden == config.hidden, "model ", config.name, " has hidden size ",
                    config.hidden, " but the hardware file (or --hidden) gives ", hw.hidden);
    GRACE_CHECK_ARG(hw.intermediate <= 0 || hw.intermediate == config.intermediate, "model ", config.name,
                    " has expert intermediate size ", config.intermediate,
                    " but the hardware file (or --intermediate) gives ", hw.intermediate);
    ModelShape s;
    s.model = config.name;
    s.hidden = config.hidden;
    s.intermediate = config.intermediate;
    s.num_experts = config.num_experts;
    s.num_layers = config.num_moe_layers();
    return s;
}

void check_model_shape(const ModelShape& shape, int num_experts, int num_layers, const std::string& what) {
    const std::string name = shape.model.empty() ? std::string("the model") : "model " + shape.model;
    GRACE_CHECK_INPUT(shape.num_experts <= 0 || shape.num_experts == num_experts, name, " has ", shape.num_experts,
                      " routed experts but ", what, " has ", num_experts);
    GRACE_CHECK_INPUT(shape.num_layers <= 0 || shape.num_layers == num_layers, name, " has ", shape.num_layers,
                      " MoE layers but ", what, " has ", num_layers);
}

}  // namespace grace
