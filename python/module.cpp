// The `grace._grace` extension: trace I/O, plan JSON, topology and the replica router (this file), statistics
// and profiling (bind_stats.cpp), the planner (bind_planner.cpp) and the evaluator/export (bind_eval.cpp).
#include <pybind11/pybind11.h>

#include "bind_common.hpp"
#include "grace/routing.hpp"

namespace grace::py_bind {

namespace {

void require_rank(const py::array& a, const char* name, std::initializer_list<int> ranks) {
    for (int r : ranks)
        if (a.ndim() == r) return;
    std::string want;
    for (int r : ranks) want += (want.empty() ? "" : " or ") + std::to_string(r);
    GRACE_CHECK_ARG(false, name, " must have ", want, " dimensions, got shape ", shape_str(shape_of(a)));
}

py::array as_array(const py::object& obj, const char* name) {
    GRACE_CHECK_ARG(py::isinstance<py::array>(obj), name, " must be a NumPy array, got ",
                    py::str(obj.get_type()).cast<std::string>());
    return py::reinterpret_borrow<py::array>(obj);
}

// A router with the plan it points into (ReplicaRouter keeps a pointer to its LayerPlan).
struct PyRouter {
    std::unique_ptr<ExpertPlan> plan;
    std::unique_ptr<ReplicaRouter> router;
};

}  // namespace

std::vector<int64_t> int_values(const py::object& obj, const char* name, std::initializer_list<int> ranks,
                                std::vector<int64_t>* shape) {
    py::array a = as_array(obj, name);
    char kind = a.dtype().kind();
    GRACE_CHECK_ARG(kind == 'i' || kind == 'u', name, " must be an integer array, got dtype ", dtype_str(a));
    require_rank(a, name, ranks);
    if (shape) *shape = shape_of(a);
    auto c = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    GRACE_CHECK_ARG(c, name, ": cannot convert dtype ", dtype_str(a), " to int64");
    if (kind == 'u' && a.dtype().itemsize() == 8) {  // uint64 above INT64_MAX would wrap
        auto u = py::array_t<uint64_t, py::array::c_style>::ensure(a);
        for (py::ssize_t i = 0; i < u.size(); ++i)
            GRACE_CHECK_ARG(u.data()[i] <= static_cast<uint64_t>(INT64_MAX), name, ": value ", u.data()[i],
                            " does not fit int64");
    }
    return std::vector<int64_t>(c.data(), c.data() + c.size());
}

std::vector<double> real_values(const py::object& obj, const char* name, std::initializer_list<int> ranks,
                                std::vector<int64_t>* shape) {
    py::array a = as_array(obj, name);
    char kind = a.dtype().kind();
    GRACE_CHECK_ARG(kind == 'i' || kind == 'u' || kind == 'f', name,
                    " must be a real (float or integer) array, got dtype ", dtype_str(a));
    require_rank(a, name, ranks);
    if (shape) *shape = shape_of(a);
    auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
    return std::vector<double>(c.data(), c.data() + c.size());
}

RoutingTrace trace_from_arrays(const py::object& ids, int num_experts, const py::object& weights,
                               const std::string& model, const std::string& dataset) {
    std::vector<int64_t> shape;
    std::vector<int64_t> v = int_values(ids, "ids", {2, 3}, &shape);
    if (shape.size() == 2) shape.insert(shape.begin() + 1, 1);
    RoutingTrace t;
    t.num_tokens = shape[0];
    t.num_layers = static_cast<int>(shape[1]);
    t.top_k = static_cast<int>(shape[2]);
    t.num_experts = num_experts;
    t.model = model;
    t.dataset = dataset;
    GRACE_CHECK_ARG(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
    t.expert_ids.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        GRACE_CHECK_INPUT(v[i] >= 0 && v[i] < num_experts, "ids: expert id ", v[i], " at token ",
                          i / std::max<int64_t>(1, shape[1] * shape[2]), " is outside [0, ", num_experts, ")");
        t.expert_ids[i] = static_cast<int32_t>(v[i]);
    }
    if (!weights.is_none()) {
        std::vector<int64_t> ws;
        py::array wa = as_array(weights, "weights");
        GRACE_CHECK_ARG(wa.dtype().kind() == 'f', "weights must be a float array, got dtype ", dtype_str(wa));
        std::vector<double> w = real_values(weights, "weights", {2, 3}, &ws);
        GRACE_CHECK_ARG(static_cast<int64_t>(w.size()) == t.num_tokens * t.num_layers * t.top_k &&
                            ws[0] == t.num_tokens && ws.back() == t.top_k,
                        "weights must have the ids' shape ", shape_str(shape_of(as_array(ids, "ids"))), ", got ",
                        shape_str(ws));
        t.gate_weights.assign(w.begin(), w.end());
    }
    t.validate();
    return t;
}

py::dict trace_to_dict(const RoutingTrace& t) {
    py::dict d;
    std::vector<int64_t> shape = {t.num_tokens, t.num_layers, t.top_k};
    d["ids"] = to_array(t.expert_ids, shape);
    d["weights"] = t.has_weights() ? py::object(to_array(t.gate_weights, shape)) : py::none();
    d["num_experts"] = t.num_experts;
    d["num_layers"] = t.num_layers;
    d["top_k"] = t.top_k;
    d["num_tokens"] = t.num_tokens;
    d["model"] = t.model;
    d["dataset"] = t.dataset;
    return d;
}

ExpertPlan plan_from_py(const py::object& plan) {
    std::string text;
    if (py::isinstance<py::str>(plan)) {
        text = plan.cast<std::string>();
    } else {
        GRACE_CHECK_ARG(py::isinstance<py::dict>(plan), "plan must be a dict (grace.plan/v1) or a JSON string, got ",
                        py::str(plan.get_type()).cast<std::string>());
        text = py::module_::import("json").attr("dumps")(plan).cast<std::string>();
    }
    return plan_from_json(text);
}

py::dict plan_to_py(const ExpertPlan& plan) { return py::module_::import("json").attr("loads")(plan_to_json(plan)); }

Topology topology_from_py(const py::object& obj) {
    if (py::isinstance<py::str>(obj)) return Topology::parse(obj.cast<std::string>());
    if (py::isinstance<Topology>(obj)) return obj.cast<Topology>();
    if (py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) {
        auto seq = obj.cast<std::vector<int>>();
        GRACE_CHECK_ARG(seq.size() == 2 || seq.size() == 3, "topology tuple must be (nodes, gpus_per_node[, slots])");
        Topology t;
        t.nodes = seq[0];
        t.gpus_per_node = seq[1];
        if (seq.size() == 3) t.slots_per_gpu = seq[2];
        t.validate();
        return t;
    }
    GRACE_CHECK_ARG(false, "topology must be \"NxM\", (N, M) or a grace.Topology, got ",
                    py::str(obj.get_type()).cast<std::string>());
    return {};
}

void bind_core(py::module_& m) {
    py::class_<Topology>(m, "Topology", "N nodes x M GPUs per node, optional expert slots per GPU")
        .def(py::init([](int nodes, int gpus_per_node, std::optional<int> slots) {
                 Topology t;
                 t.nodes = nodes;
                 t.gpus_per_node = gpus_per_node;
                 t.slots_per_gpu = slots;
                 t.validate();
                 return t;
             }),
             py::arg("nodes"), py::arg("gpus_per_node"), py::arg("slots_per_gpu") = py::none())
        .def_static("parse", &Topology::parse, py::arg("text"), "Parses \"NxM\"")
        .def_readonly("nodes", &Topology::nodes)
        .def_readonly("gpus_per_node", &Topology::gpus_per_node)
        .def_readonly("slots_per_gpu", &Topology::slots_per_gpu)
        .def_property_readonly("num_gpus", &Topology::num_gpus)
        .def("node_of", &Topology::node_of)
        .def("__str__", &Topology::to_string)
        .def("__repr__", [](const Topology& t) { return "grace.Topology('" + t.to_string() + "')"; })
        .def("__eq__", [](const Topology& a, const Topology& b) { return a == b; });

    m.def(
        "load_trace",
        [](const std::string& path, std::optional<int> num_experts, std::optional<std::string> weights) {
            TraceOverrides o;
            o.num_experts = num_experts;
            o.weights_path = weights;
            return trace_to_dict(load_trace(path, o));
        },
        py::arg("path"), py::arg("num_experts") = py::none(), py::arg("weights") = py::none(),
        "Loads a trace (.npy + .json metadata) as the CLI does: dict with 'ids' int32 [T, L, k], 'weights' float32 "
        "[T, L, k] or None, 'num_experts', 'num_layers', 'top_k', 'num_tokens', 'model', 'dataset'.");
    m.def(
        "save_trace",
        [](const std::string& path, const py::object& ids, int num_experts, const py::object& weights,
           const std::string& model, const std::string& dataset) {
            save_trace(trace_from_arrays(ids, num_experts, weights, model, dataset), path);
        },
        py::arg("path"), py::arg("ids"), py::arg("num_experts"), py::arg("weights") = py::none(), py::arg("model") = "",
        py::arg("dataset") = "",
        "Writes ids [T, L, k] (any integer dtype) as an int32 trace plus metadata (and weights).");
    m.def(
        "validate_trace",
        [](const py::object& ids, int num_experts, const py::object& weights) {
            trace_from_arrays(ids, num_experts, weights, "", "");
        },
        py::arg("ids"), py::arg("num_experts"), py::arg("weights") = py::none(),
        "Raises GraceError naming the first violation of the trace invariants (ids in [0, E), distinct per token).");

    m.def(
        "load_plan", [](const std::string& path) { return plan_to_py(load_plan(path)); }, py::arg("path"),
        "Reads and validates a grace.plan/v1 file; returns its JSON object as a dict.");
    m.def(
        "save_plan", [](const py::object& plan, const std::string& path) { save_plan(plan_from_py(plan), path); },
        py::arg("plan"), py::arg("path"), "Validates a plan dict and writes it (canonical JSON, atomic).");
    m.def(
        "validate_plan", [](const py::object& plan) { return plan_to_py(plan_from_py(plan)); }, py::arg("plan"),
        "Validates a plan dict / JSON string; returns the canonical dict (derived fields filled).");
    m.def(
        "plan_hash", [](const py::object& plan) { return plan_hash(plan_from_py(plan)); }, py::arg("plan"),
        "64-bit FNV-1a hash of the plan's canonical JSON (what runtime ranks compare).");
    m.def(
        "plan_to_json", [](const py::object& plan) { return plan_to_json(plan_from_py(plan)); }, py::arg("plan"),
        "Canonical grace.plan/v1 JSON text of a plan.");

    m.def(
        "smooth_wrr_sequence",
        [](const std::vector<int>& weights) {
            auto s = smooth_wrr_sequence(weights);
            return to_array(std::vector<int32_t>(s.begin(), s.end()), {static_cast<int64_t>(s.size())});
        },
        py::arg("weights"), "Smooth weighted round-robin pick sequence (length sum(weights)).");
    m.def("round_weights", &round_weights, py::arg("weights"), py::arg("period"),
          "Rounds positive weights to integers >= 1 summing to period (largest remainder).");

    py::class_<PyRouter>(m, "ReplicaRouter",
                         "Stateful replica router of one plan layer (spec §5): WRR/TAR periodic sequences, "
                         "primary, and the engines' rules over the layer's slots (vllm, sglang-static, "
                         "sglang-nearest, sglang-dynamic, vllm-ascend, trtllm).")
        .def(py::init([](const py::object& plan, int layer, std::optional<std::string> policy, uint64_t seed) {
                 auto r = std::make_unique<PyRouter>();
                 r->plan = std::make_unique<ExpertPlan>(plan_from_py(plan));
                 GRACE_CHECK_ARG(layer >= 0 && layer < r->plan->num_layers, "layer ", layer, " is outside [0, ",
                                 r->plan->num_layers, ")");
                 const LayerPlan& lp = r->plan->layers[layer];
                 RoutingPolicy pol = policy ? parse_routing_policy(*policy) : lp.policy;
                 r->router = std::make_unique<ReplicaRouter>(lp, r->plan->topology, pol, seed);
                 return r;
             }),
             py::arg("plan"), py::arg("layer") = 0, py::arg("policy") = py::none(), py::arg("seed") = 0)
        .def(
            "route",
            [](PyRouter& r, int source, int expert, int64_t token, int j, int top_k) {
                const Topology& topo = r.plan->topology;
                GRACE_CHECK_ARG(source >= 0 && source < topo.num_gpus(), "source GPU ", source, " is outside [0, ",
                                topo.num_gpus(), ")");
                GRACE_CHECK_ARG(expert >= 0 && expert < r.plan->num_experts, "expert ", expert, " is outside [0, ",
                                r.plan->num_experts, ")");
                GRACE_CHECK_ARG(j >= 0 && j < top_k, "j = ", j, " must be in [0, top_k = ", top_k, ")");
                return r.router->route(source, expert, token, j, top_k);
            },
            py::arg("source"), py::arg("expert"), py::arg("token"), py::arg("j"), py::arg("top_k"),
            "GPU chosen for selection j of token `token` (its index among the tokens of GPU `source`) on GPU "
            "`source` choosing `expert`.")
        .def(
            "route_tokens",
            [](PyRouter& r, const py::object& ids, const py::object& sources, int64_t first_token) {
                std::vector<int64_t> shape, sshape;
                std::vector<int64_t> v = int_values(ids, "ids", {2}, &shape);
                std::vector<int64_t> s = int_values(sources, "sources", {1}, &sshape);
                GRACE_CHECK_ARG(sshape[0] == shape[0], "sources has ", sshape[0], " entries, ids ", shape[0],
                                " tokens");
                const int G = r.plan->topology.num_gpus(), E = r.plan->num_experts;
                for (int64_t x : s) GRACE_CHECK_ARG(x >= 0 && x < G, "sources: GPU ", x, " is outside [0, ", G, ")");
                for (int64_t x : v) GRACE_CHECK_ARG(x >= 0 && x < E, "ids: expert ", x, " is outside [0, ", E, ")");
                const int k = static_cast<int>(shape[1]);
                std::vector<int32_t> out(v.size());
                for (int64_t t = 0; t < shape[0]; ++t)
                    for (int j = 0; j < k; ++j)
                        out[t * k + j] = r.router->route(static_cast<int>(s[t]), static_cast<int>(v[t * k + j]),
                                                         first_token + t, j, k);
                return to_array(out, shape);
            },
            py::arg("ids"), py::arg("sources"), py::arg("first_token") = 0,
            "Routes ids [T, k] of tokens on GPUs sources [T] in order; returns destination GPUs int32 [T, k].")
        .def(
            "flat_sequences",
            [](const PyRouter& r) {
                const std::vector<uint8_t> seq = r.router->flat_sequences();
                return to_array(seq, {r.plan->topology.num_gpus(), r.plan->num_experts, r.router->period()});
            },
            "All WRR/TAR pick sequences, uint8 [G, E, Q] (source GPU, expert, position): instance indices into "
            "the expert's routing.instances, for device-side routing (grace.engines).")
        .def_property(
            "offsets",
            [](const PyRouter& r) {
                const auto& o = r.router->offsets();
                return to_array(std::vector<int32_t>(o.begin(), o.end()),
                                {r.plan->topology.num_gpus(), r.plan->num_experts});
            },
            [](PyRouter& r, const py::object& offsets) {
                std::vector<int64_t> shape;
                std::vector<int64_t> v = int_values(offsets, "offsets", {2}, &shape);
                const int G = r.plan->topology.num_gpus(), E = r.plan->num_experts;
                GRACE_CHECK_ARG(shape[0] == G && shape[1] == E, "offsets must have shape [", G, ", ", E, "], got ",
                                shape_str(shape));
                std::vector<int> o;
                o.reserve(v.size());
                for (int64_t x : v) {
                    GRACE_CHECK_ARG(x >= 0 && x < r.router->period(), "offsets: WRR offset ", x, " is outside [0, ",
                                    r.router->period(), ")");
                    o.push_back(static_cast<int>(x));
                }
                r.router->set_offsets(o);
            },
            "WRR counters int32 [G, E]: selections routed per (source GPU, expert), mod Q; settable.")
        .def_property_readonly("period", [](const PyRouter& r) { return r.router->period(); })
        .def_property_readonly("policy", [](const PyRouter& r) { return to_string(r.router->policy()); })
        .def("reset", [](PyRouter& r) { r.router->reset(); })
        .def(
            "sequence",
            [](const PyRouter& r, int source, int expert) {
                GRACE_CHECK_ARG(
                    source >= 0 && source < r.plan->topology.num_gpus() && expert >= 0 && expert < r.plan->num_experts,
                    "(source, expert) = (", source, ", ", expert, ") out of range");
                const uint8_t* p = r.router->sequence(source, expert);
                return to_array(std::vector<int32_t>(p, p + r.router->period()), {r.router->period()});
            },
            py::arg("source"), py::arg("expert"), "WRR/TAR pick sequence (instance indices) of (source, expert).");
}

}  // namespace grace::py_bind

PYBIND11_MODULE(_grace, m) {
    namespace py = pybind11;
    m.doc() = "GRACE core bindings (see docs/python.md)";
    m.attr("__version__") = "0.1.0";
    py::register_exception<grace::Error>(m, "GraceError", PyExc_ValueError);
    grace::py_bind::bind_core(m);
    // Each part is linked only once the core it binds exists (python/bind_*.cpp); weak references keep the module
    // importable while another part is still being written.
    if (&grace::py_bind::bind_stats) grace::py_bind::bind_stats(m);
    if (&grace::py_bind::bind_planner) grace::py_bind::bind_planner(m);
    if (&grace::py_bind::bind_eval) grace::py_bind::bind_eval(m);
    if (&grace::py_bind::bind_engines) grace::py_bind::bind_engines(m);
    if (&grace::py_bind::bind_ep) grace::py_bind::bind_ep(m);
    if (&grace::py_bind::bind_ep_cuda) grace::py_bind::bind_ep_cuda(m);
}
