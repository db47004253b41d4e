#include "grace/pricing.hpp"

#include <cmath>
#include <memory>

#include "grace/error.hpp"

namespace grace {

PlacementPricing placement_pricing(const HardwareModel& hardware, const ModelShape& shape) {
    hardware.validate();
    PlacementPricing p;
    p.bytes_per_token = static_cast<double>(shape.hidden) * hardware.element_size;
    p.net_bandwidth = hardware.cross_node_bandwidth;
    p.nvl_bandwidth = hardware.intra_node_bandwidth;
    auto compute = std::make_shared<ComputeModel>(hardware, shape.model, shape.hidden, shape.intermediate);
    p.expert_seconds = [compute](double n) {
        if (!(n > 0)) return 0.0;
        return compute->expert_seconds(std::max<int64_t>(1, std::llround(n)));
    };
    p.validate();
    return p;
}

PlacementPricing planner_pricing(const HardwareModel& hardware, const std::string& model, std::string* note) {
    if (note) note->clear();
    try {
        return placement_pricing(hardware, resolve_model_shape(hardware, model));
    } catch (const Error& e) {
        if (e.code() != ErrorCode::kInvalidArgument) throw;
        if (note) *note = cat("placements priced with the default shape (H=2048, I=1024): ", e.what());
    }
    PlacementPricing p;
    p.bytes_per_token = 2048.0 * hardware.element_size;
    p.net_bandwidth = hardware.cross_node_bandwidth;
    p.nvl_bandwidth = hardware.intra_node_bandwidth;
    p.validate();
    return p;
}

}  // namespace grace
