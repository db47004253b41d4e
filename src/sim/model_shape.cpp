#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/generator.hpp"

namespace grace {

ModelShape resolve_model_shape(const HardwareModel& hw, const std::string& model) {
    ModelShape s;
    s.model = model;
    s.hidden = hw.hidden;
    s.intermediate = hw.intermediate;
    if (s.hidden > 0 && s.intermediate > 0) return s;
    bool known = false;
    std::string names;
    for (const auto& p : model_presets()) {
        known |= p.name == model;
        if (!names.empty()) names += ", ";
        names += p.name;
    }
    // No command-line flags here: callers differ in what they accept (eval adds its --hidden/--intermediate).
    GRACE_CHECK_ARG(known, "model '", model, "' has no preset (", names,
                    "): name one as the trace's model, or give \"hidden\" and \"intermediate\" in the hardware file");
    const ModelPreset& p = find_preset(model);
    if (s.hidden <= 0) s.hidden = p.hidden;
    if (s.intermediate <= 0) s.intermediate = p.intermediate;
    return s;
}

}  // namespace grace
