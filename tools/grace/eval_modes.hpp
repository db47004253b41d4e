#pragma once
// `grace eval --adapt N` and `grace eval --switch-plan PLAN2 --switch-at TOKEN` (docs/eval.md): the replays that
// need the whole trace in memory, and their reports.
#include <cstdint>
#include <string>

#include "grace/adaptation.hpp"
#include "grace/eval.hpp"
#include "grace/plan.hpp"
#include "grace/trace.hpp"

namespace grace::cli {

/// Replays with online adaptation, prices, and writes STEM.json (the usual report plus "adaptation") and
/// STEM.csv. Returns the exit code.
int eval_adaptive(const RoutingTrace& trace, const ExpertPlan& plan, const EvalOptions& opt, const ModelShape& shape,
                  const AdaptationOptions& adapt, const std::string& output);

/// Replays tokens [0, switch_at) on `plan` and [switch_at, T) on `plan2` (each part priced as its own batch,
/// routers starting afresh), prices the migration between them, and writes STEM.json and STEM.csv.
int eval_switch(const RoutingTrace& trace, const ExpertPlan& plan, const ExpertPlan& plan2, const EvalOptions& opt,
                const ModelShape& shape, int64_t switch_at, double bytes_per_expert, const std::string& plan_paths,
                const std::string& output);

}  // namespace grace::cli
