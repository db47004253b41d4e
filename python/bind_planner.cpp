// Binding of the planner (`grace plan`).
#include <cmath>

#include "bind_common.hpp"
#include "grace/eplb.hpp"
#include "grace/hardware.hpp"
#include "grace/planner.hpp"
#include "grace/pricing.hpp"

namespace grace::py_bind {

void bind_planner(py::module_& m) {
    m.def(
        "plan",
        [](const py::object& stats, const py::object& topology, const std::string& method, uint64_t seed, int threads,
           int wrr_period, bool refine, std::optional<int> slots_per_gpu, const std::string& source, bool fill_slots,
           const std::string& hardware, double robust) {
            const RoutingStats st = stats_from_py(stats);
            Topology topo = topology_from_py(topology);
            if (slots_per_gpu) {
                GRACE_CHECK_ARG(*slots_per_gpu >= 1, "slots_per_gpu must be >= 1, got ", *slots_per_gpu);
                topo.slots_per_gpu = *slots_per_gpu;
            }
            PlanOptions opt;
            opt.method = method;
            opt.seed = seed;
            opt.num_threads = threads;
            opt.wrr_period = wrr_period;
            opt.refine = refine;
            opt.fill_slots = fill_slots;
            GRACE_CHECK_ARG(robust == 0 || (std::isfinite(robust) && robust > 0 && robust <= 1), "robust = ", robust,
                            " must be 0 (mean loads) or a quantile in (0, 1]");
            opt.robust_quantile = robust;
            // As `grace plan`: the hardware is loaded (a bad name fails) and prices every plan that uses pricing
            // (the default priced methods too, not only slot-filling ones; it was ignored without slots_per_gpu).
            const HardwareModel hw = load_hardware(hardware);
            if (uses_pricing(opt, topo)) opt.pricing = planner_pricing(hw, st.model, nullptr);
            ExpertPlan plan;
            {
                py::gil_scoped_release release;
                plan = make_plan(st, topo, opt);
            }
            plan.source = source;
            return plan_to_py(plan);
        },
        py::arg("stats"), py::arg("topology"), py::arg("method") = "grace", py::arg("seed") = 0, py::arg("threads") = 0,
        py::arg("wrr_period") = 120, py::arg("refine") = false, py::arg("slots_per_gpu") = py::none(),
        py::arg("source") = "", py::arg("fill_slots") = true, py::arg("hardware") = "a100-testbed",
        py::arg("robust") = 0.0,
        "Plans expert placement from a statistics dict (grace.profile / grace.load_stats) on a topology (\"NxM\" or "
        "(N, M)) with a method spec (e.g. 'grace' = priced+priced+tar, 'grace-paper' = hierarchical+dynamic+tar); returns the grace.plan/v1 dict, as "
        "`grace plan` writes it (`source` is the plan's free-text 'source' field; the CLI puts the stats path there). "
        "`hardware` prices placements as `grace plan --hardware` does (the priced methods, the slot fill). "
        "With slots_per_gpu, every GPU holds exactly that many instances (free slots filled with priced replicas) "
        "unless fill_slots=False. robust=q in (0, 1] plans for each expert's "
        "q-quantile load over the profile's windows (statistics from profile(..., window_tokens=W)), as "
        "`grace plan --robust q`.");
    m.def(
        "parse_method", [](const std::string& text) { return parse_method(text).to_string(); }, py::arg("text"),
        "Canonical form of a method spec; raises GraceError for an unknown component.");
    m.def(
        "rebalance_experts",
        [](const py::object& weight, int num_replicas, int num_groups, int num_nodes, int num_gpus) {
            std::vector<int64_t> shape;
            std::vector<double> w = real_values(weight, "weight", {2}, &shape);
            GRACE_CHECK_ARG(shape[0] >= 1 && shape[1] >= 1, "weight must be [layers, experts] with both >= 1, got ",
                            shape_str(shape));
            GRACE_CHECK_ARG(shape[0] <= (1 << 20) && shape[1] <= (1 << 20), "weight shape ", shape_str(shape),
                            " is too large (at most 2^20 layers and experts)");
            const int L = static_cast<int>(shape[0]), E = static_cast<int>(shape[1]);
            EplbResult r;
            {
                py::gil_scoped_release release;
                r = rebalance_experts(w, L, E, num_replicas, num_groups, num_nodes, num_gpus);
            }
            auto widen = [](const std::vector<int>& v) { return std::vector<int64_t>(v.begin(), v.end()); };
            return py::make_tuple(to_array(widen(r.phy2log), {L, r.num_physical}),
                                  to_array(widen(r.log2phy), {L, E, r.max_replicas}), to_array(widen(r.logcnt), {L, E}));
        },
        py::arg("weight"), py::arg("num_replicas"), py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_gpus"),
        "DeepSeek's EPLB (spec section 8) as grace implements it: weight [L, E] loads (any real dtype) -> (phy2log "
        "int64 [L, P], log2phy int64 [L, E, X] (-1 padded), logcnt int64 [L, E]). Ties are broken by the lower index "
        "and loads are compared in double precision (bench/results/eplb.md says how this differs from eplb.py).");
}

}  // namespace grace::py_bind
