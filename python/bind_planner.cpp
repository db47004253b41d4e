// Binding of the planner (`grace plan`).
#include "bind_common.hpp"
#include "grace/planner.hpp"

namespace grace::py_bind {

void bind_planner(py::module_& m) {
    m.def(
        "plan",
        [](const py::object& stats, const py::object& topology, const std::string& method, uint64_t seed, int threads,
           int wrr_period, bool refine, std::optional<int> slots_per_gpu, const std::string& source) {
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
        py::arg("source") = "",
        "Plans expert placement from a statistics dict (grace.profile / grace.load_stats) on a topology (\"NxM\" or "
        "(N, M)) with a method spec (e.g. 'grace' = hierarchical+dynamic+tar); returns the grace.plan/v1 dict, as "
        "`grace plan` writes it (`source` is the plan's free-text 'source' field; the CLI puts the stats path there).");
    m.def(
        "parse_method", [](const std::string& text) { return parse_method(text).to_string(); }, py::arg("text"),
        "Canonical form of a method spec; raises GraceError for an unknown component.");
}

}  // namespace grace::py_bind
