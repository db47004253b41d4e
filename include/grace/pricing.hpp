#pragma once
/// @file pricing.hpp
/// The planner's pricing (placement_cost.hpp) from the evaluator's hardware model and model shape, so that a
/// slot-exact fill prices replicas with the same links and GEMM times `grace eval` reports.

#include "grace/eval.hpp"
#include "grace/hardware.hpp"
#include "grace/placement_cost.hpp"

namespace grace {

/// bytes per token = H * element size; B_net and B_nvl from the hardware; f(n) = ComputeModel::expert_seconds at
/// n rounded to the nearest count (at least 1 for n > 0). Throws as ComputeModel for a bad shape.
PlacementPricing placement_pricing(const HardwareModel& hardware, const ModelShape& shape);

/// What `grace plan` (and grace.plan in Python) fill slots with: placement_pricing for the model shape that
/// resolve_model_shape gives `model` on `hardware`; when it gives none (a model without a preset and no sizes in
/// the hardware file), the hardware's links and element size with the default shape of placement_cost.hpp
/// (H = 2048, I = 1024, analytic GEMM), and `*note` says so (else it is cleared).
PlacementPricing planner_pricing(const HardwareModel& hardware, const std::string& model, std::string* note);

}  // namespace grace
