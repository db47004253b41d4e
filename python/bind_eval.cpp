// Bindings of the evaluator (`grace eval`) and the exports (`grace export`); same steps as the CLI commands.
#include "bind_common.hpp"
#include "grace/eval.hpp"
#include "grace/export.hpp"
#include "grace/hardware.hpp"

namespace grace::py_bind {

namespace {

py::object json_loads(const std::string& text) { return py::module_::import("json").attr("loads")(text); }

std::vector<double> expert_load_from_py(const py::object& load, const ExpertPlan& plan) {
    if (load.is_none()) return {};
    std::vector<int64_t> shape;
    std::vector<double> v = real_values(load, "expert_load", {2}, &shape);
    GRACE_CHECK_ARG(shape[0] == plan.num_layers && shape[1] == plan.num_experts, "expert_load must be [L, E] = [",
                    plan.num_layers, ", ", plan.num_experts, "], got ", shape_str(shape));
    return v;
}

}  // namespace

void bind_eval(py::module_& m) {
    m.def(
        "evaluate",
        [](const py::object& ids, const py::object& plan_obj, const std::string& comm,
           std::optional<std::string> routing, const std::string& hardware, int hidden, int intermediate, int threads,
           std::optional<int> num_experts, const std::string& model, const std::string& dataset, int64_t batch_tokens,
           std::optional<std::string> workload) {
            // The CLI's checks, then the library's evaluate (the CLI streams the same replay from a file).
            EvalOptions opt;
            opt.scheme = parse_comm_scheme(comm);
            if (routing) opt.replay.policy = parse_routing_policy(*routing);
            opt.replay.num_threads = threads;
            GRACE_CHECK_ARG(batch_tokens >= 0, "batch_tokens must be >= 1 (0 = the whole trace), got ", batch_tokens);
            opt.batching.batch_tokens = batch_tokens;
            if (workload) opt.batching.workload = parse_workload(*workload);
            opt.hardware = load_hardware(hardware);
            if (hidden > 0) opt.hardware.hidden = hidden;
            if (intermediate > 0) opt.hardware.intermediate = intermediate;
            const ExpertPlan plan = plan_from_py(plan_obj);
            const int e = num_experts ? *num_experts : plan.num_experts;
            const RoutingTrace trace = trace_from_arrays(ids, e, py::none(), model, dataset);
            GRACE_CHECK_INPUT(plan.num_experts == trace.num_experts, "the plan has ", plan.num_experts,
                              " experts but the trace has ", trace.num_experts);
            GRACE_CHECK_INPUT(plan.num_layers == trace.num_layers, "the plan has ", plan.num_layers,
                              " layers but the trace has ", trace.num_layers);
            EvalReport report;
            {
                py::gil_scoped_release release;
                report = evaluate(trace, plan, opt);
            }
            return json_loads(report_to_json(report));
        },
        py::arg("ids"), py::arg("plan"), py::arg("comm") = "hsc", py::arg("routing") = py::none(),
        py::arg("hardware") = "a100-testbed", py::arg("hidden") = 0, py::arg("intermediate") = 0,
        py::arg("threads") = 0, py::arg("num_experts") = py::none(), py::arg("model") = "", py::arg("dataset") = "",
        py::arg("batch_tokens") = 0, py::arg("workload") = py::none(),
        "Replays ids [T, L, k] through a plan (dict) under a routing policy (default: the plan's) and a "
        "communication scheme (flat, flat-dedup, 2dh, hsc), priced with a hardware preset or file; returns the "
        "report dict (the JSON `grace eval` writes). `model` selects the model preset for H and I. "
        "`batch_tokens` B and `workload` 'SxP+D' price the trace batch by batch, as `grace eval --batch-tokens "
        "--workload` (0 and None: the whole trace is one batch).");

    m.def(
        "export",
        [](const py::object& plan_obj, const std::string& format, int layer_offset, const py::object& expert_load,
           std::optional<std::string> path) -> py::object {
            ExportOptions opt;
            opt.format = parse_export_format(format);
            opt.layer_offset = layer_offset;
            const ExpertPlan plan = plan_from_py(plan_obj);
            opt.expert_load = expert_load_from_py(expert_load, plan);
            if (path) {
                export_plan(plan, opt, *path);
                return py::none();
            }
            const PhysicalMap pm = build_physical_map(plan, opt.expert_load);
            const std::string text = export_text(pm, opt);
            if (opt.format == ExportFormat::kTrtllm) return py::str(text);
            return json_loads(text);
        },
        py::arg("plan"), py::arg("format") = "sglang", py::arg("layer_offset") = 0, py::arg("expert_load") = py::none(),
        py::arg("path") = py::none(),
        "Exports a plan for an engine: sglang | vllm-ascend | eplb -> dict (the JSON `grace export` writes), trtllm "
        "-> YAML text. With `path`, writes the file (eplb: a folder of .npy unless path ends in .json) and returns "
        "None. `expert_load` [L, E] chooses padding replicas (as `grace export --stats`).");

    m.def(
        "physical_map",
        [](const py::object& plan_obj, const py::object& expert_load) {
            const ExpertPlan plan = plan_from_py(plan_obj);
            const PhysicalMap pm = build_physical_map(plan, expert_load_from_py(expert_load, plan));
            py::dict d;
            d["phy2log"] = to_array(std::vector<int32_t>(pm.phy2log.begin(), pm.phy2log.end()),
                                    {pm.num_layers, pm.num_physical()});
            d["num_gpus"] = pm.num_gpus;
            d["slots_per_gpu"] = pm.slots_per_gpu;
            d["num_padded"] = pm.num_padded;
            return d;
        },
        py::arg("plan"), py::arg("expert_load") = py::none(),
        "Equal-slot physical map of a plan: {'phy2log': int32 [L, G*S], 'num_gpus', 'slots_per_gpu', 'num_padded'}.");

    m.def("hardware_presets", &hardware_presets, "Names of the built-in hardware models.");
}

}  // namespace grace::py_bind
