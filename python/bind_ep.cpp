// grace._grace._ep: the expert-parallel pieces behind the grace.ep package: HostCommunicator (PyCommunicator, a
// grace::Communicator whose collectives call a Python object such as grace.ep._torch_comm.TorchComm), CpuLayer
// (grace::MoeLayer in phases over a HostCommunicator, for grace/ep/_cpu.py) and experts() (the local SwiGLU
// experts on the caller's weights).
//
// Arrays cross without copies where they can: inputs must be C-contiguous NumPy arrays of the exact dtype (no
// silent conversion; torch's t.numpy() shares memory), except topk_idx int64, which is narrowed to int32 (one
// [T, k] copy); outputs own their std::vector through a capsule (torch.from_numpy shares it). The GIL is
// released around every layer call; PyCommunicator takes it back for each collective.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>

#include "bind_common.hpp"
#include "grace/eval.hpp"
#include "grace/experts.hpp"
#include "grace/runtime.hpp"
#include "py_communicator.hpp"

namespace grace::py_bind {

namespace {

CommGroup parse_group(const std::string& name) {
    GRACE_CHECK_ARG(name == "global" || name == "node", "group must be 'global' or 'node', got '", name, "'");
    return name == "global" ? CommGroup::kGlobal : CommGroup::kNode;
}

std::vector<uint8_t> bytes_of(const py::object& obj, const char* name) {
    auto a = py::array_t<uint8_t, py::array::c_style>::ensure(obj);
    GRACE_CHECK_ARG(a && a.ndim() == 1, name, " must be a 1-D uint8 array");
    return std::vector<uint8_t>(a.data(), a.data() + a.size());
}

void bind_host_communicator(py::module_& ep) {
    py::class_<PyCommunicator>(ep, "HostCommunicator", R"doc(
A host-memory grace::Communicator whose collectives call `impl` (see python/py_communicator.hpp for the methods it
needs; grace.ep._torch_comm.TorchComm provides them over torch.distributed gloo groups).

HostCommunicator(impl, topology, timeout_s=0.0): topology "NxM" or (N, M) with N*M == impl.size. The methods below
call the collectives directly (with the GIL released, as the MoE layer does); they exist for tests and tools.
)doc")
        .def(py::init([](py::object impl, const py::object& topology, double timeout_s) {
                 CommunicatorOptions options;
                 options.topology = topology_from_py(topology);
                 options.timeout_s = timeout_s;
                 return std::make_unique<PyCommunicator>(std::move(impl), options);
             }),
             py::arg("impl"), py::arg("topology"), py::arg("timeout_s") = 0.0)
        .def_property_readonly("rank", &PyCommunicator::rank)
        .def_property_readonly("size", &PyCommunicator::size)
        .def_property_readonly("node", &PyCommunicator::node)
        .def_property_readonly("local_rank", &PyCommunicator::local_rank)
        .def_property_readonly("backend", &PyCommunicator::backend)
        .def_property_readonly("timeout_s", &PyCommunicator::timeout_s)
        .def_property_readonly("topology", [](const PyCommunicator& c) { return c.topology().to_string(); })
        .def(
            "alltoallv",
            [](PyCommunicator& c, const std::string& group, const py::object& send,
               const std::vector<size_t>& send_counts, const std::vector<size_t>& recv_counts) {
                const CommGroup g = parse_group(group);
                const std::vector<uint8_t> data = bytes_of(send, "send");
                AlltoallvLayout layout;
                layout.send_counts = send_counts;
                layout.recv_counts = recv_counts;
                size_t soff = 0, roff = 0;
                for (size_t c : send_counts) layout.send_displs.push_back(soff), soff += c;
                for (size_t c : recv_counts) layout.recv_displs.push_back(roff), roff += c;
                GRACE_CHECK_ARG(soff == data.size(), "send has ", data.size(), " bytes, the counts sum to ", soff);
                std::vector<uint8_t> out(roff);
                {
                    py::gil_scoped_release release;
                    c.alltoallv(g, data.data(), out.data(), layout);
                }
                return to_array(out, {static_cast<int64_t>(out.size())});
            },
            py::arg("group"), py::arg("send"), py::arg("send_counts"), py::arg("recv_counts"),
            "Variable all-to-all of packed bytes on the 'global' or 'node' group -> uint8 array of the received "
            "bytes (rank order).")
        .def(
            "exchange_counts",
            [](PyCommunicator& c, const std::string& group, const std::vector<uint64_t>& send,
               const std::vector<uint8_t>& peers) {
                const CommGroup g = parse_group(group);
                py::gil_scoped_release release;
                return c.exchange_counts(g, send, peers);
            },
            py::arg("group"), py::arg("send"), py::arg("peers"))
        .def(
            "allgather",
            [](PyCommunicator& c, uint64_t value) {
                py::gil_scoped_release release;
                return c.allgather(value);
            },
            py::arg("value"))
        .def(
            "allgather_bytes",
            [](PyCommunicator& c, const py::bytes& data) {
                const std::string s = data;
                std::vector<uint8_t> out;
                {
                    py::gil_scoped_release release;
                    out = c.allgather_bytes(s.data(), s.size());
                }
                return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
            },
            py::arg("data"))
        .def(
            "allreduce_sum",
            [](PyCommunicator& c, std::vector<double> values) {
                py::gil_scoped_release release;
                c.allreduce_sum(values);
                return values;
            },
            py::arg("values"))
        .def(
            "allreduce_max",
            [](PyCommunicator& c, std::vector<double> values) {
                py::gil_scoped_release release;
                c.allreduce_max(values);
                return values;
            },
            py::arg("values"))
        .def("barrier", [](PyCommunicator& c) {
            py::gil_scoped_release release;
            c.barrier();
        });
}

// A NumPy array that owns `data` (moved into a capsule): no copy on the way to Python.
template <typename T>
py::array_t<T> owned(std::vector<T>&& data, std::vector<int64_t> shape) {
    auto* heap = new std::vector<T>(std::move(data));
    py::capsule base(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    std::vector<py::ssize_t> dims(shape.begin(), shape.end()), strides(dims.size());
    py::ssize_t stride = sizeof(T);
    for (size_t i = dims.size(); i-- > 0;) strides[i] = stride, stride *= dims[i];
    return py::array_t<T>(dims, strides, heap->data(), base);
}

// A C-contiguous array of dtype T and `ndim` dimensions named `name` (shape described by `dims`, e.g. "[T, H]").
template <typename T>
py::array_t<T> input(const py::object& obj, const char* name, int ndim, const char* dims) {
    GRACE_CHECK_ARG(py::isinstance<py::array>(obj), name, " must be an array, got ",
                    py::str(obj.get_type()).cast<std::string>());
    auto a = py::reinterpret_borrow<py::array>(obj);
    GRACE_CHECK_ARG(a.dtype().equal(py::dtype::of<T>()), name, " must be ",
                    py::str(py::dtype::of<T>()).cast<std::string>(), ", got ", dtype_str(a));
    GRACE_CHECK_ARG(a.ndim() == ndim, name, " must have shape ", dims, ", got ", shape_str(shape_of(a)));
    GRACE_CHECK_ARG(a.flags() & py::array::c_style, name, " must be contiguous");
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

// topk_idx [T, k] int32 (borrowed) or int64 (narrowed): every id -1 or in [0, E).
struct TopkIds {
    std::vector<int32_t> narrowed;
    const int32_t* data = nullptr;
    int64_t T = 0;
    int k = 0;
};
TopkIds topk_ids(const py::object& obj, int num_experts) {
    GRACE_CHECK_ARG(py::isinstance<py::array>(obj), "topk_idx must be an array");
    auto a = py::reinterpret_borrow<py::array>(obj);
    TopkIds ids;
    auto check = [&](int64_t i, int64_t v) {
        GRACE_CHECK_ARG(v == -1 || (v >= 0 && v < num_experts), "topk_idx[", i / std::max(1, ids.k), ", ",
                        i % std::max(1, ids.k), "] = ", v, ": expert id outside [0, ", num_experts, ") (-1 = none)");
    };
    if (a.dtype().equal(py::dtype::of<int32_t>())) {
        auto v = input<int32_t>(obj, "topk_idx", 2, "[T, k]");
        ids.T = v.shape(0), ids.k = static_cast<int>(v.shape(1));
        ids.data = v.data();
        for (int64_t i = 0; i < v.size(); ++i) check(i, ids.data[i]);
    } else {
        GRACE_CHECK_ARG(a.dtype().equal(py::dtype::of<int64_t>()), "topk_idx must be int64 or int32, got ",
                        dtype_str(a));
        auto v = input<int64_t>(obj, "topk_idx", 2, "[T, k]");
        ids.T = v.shape(0), ids.k = static_cast<int>(v.shape(1));
        ids.narrowed.resize(v.size());
        for (int64_t i = 0; i < v.size(); ++i) {
            check(i, v.data()[i]);
            ids.narrowed[i] = static_cast<int32_t>(v.data()[i]);
        }
        ids.data = ids.narrowed.data();
    }
    GRACE_CHECK_ARG(ids.k >= 1, "topk_idx must have k >= 1 columns, got shape ", shape_str(shape_of(a)));
    return ids;
}

// Stacked expert weights w13 [S, 2I, H] (gate rows, then up rows) and w2 [S, H, I] as views (no copy).
std::vector<ExpertWeightsView> weight_views(const py::array_t<float>& w13, const py::array_t<float>& w2) {
    const int64_t S = w13.shape(0), two_i = w13.shape(1), H = w13.shape(2);
    GRACE_CHECK_ARG(two_i % 2 == 0 && two_i > 0 && H > 0, "w13 must have shape [S, 2I, H] with I, H >= 1, got ",
                    shape_str(shape_of(w13)));
    const int64_t I = two_i / 2;
    GRACE_CHECK_ARG(w2.shape(0) == S && w2.shape(1) == H && w2.shape(2) == I, "w2 must have shape [", S, ", ", H, ", ",
                    I, "] to match w13 ", shape_str(shape_of(w13)), ", got ", shape_str(shape_of(w2)));
    std::vector<ExpertWeightsView> views(S);
    const ExpertShape shape{static_cast<int>(H), static_cast<int>(I)};
    for (int64_t s = 0; s < S; ++s)
        views[s] = {shape, w13.data() + s * two_i * H, w13.data() + s * two_i * H + I * H, w2.data() + s * H * I};
    return views;
}

// The received rows of a dispatch, checked against each other: recv_x [R, H], recv_topk [R, k], recv_weights [R, k].
struct Rows {
    py::array_t<float> x, weights;
    py::array_t<int32_t> topk;
    int64_t R = 0;
    int H = 0, k = 0;
};
Rows rows_of(const py::object& recv_x, const py::object& recv_topk, const py::object& recv_weights) {
    Rows r;
    r.x = input<float>(recv_x, "recv_x", 2, "[R, H]");
    r.topk = input<int32_t>(recv_topk, "recv_topk", 2, "[R, k]");
    r.weights = input<float>(recv_weights, "recv_weights", 2, "[R, k]");
    r.R = r.x.shape(0), r.H = static_cast<int>(r.x.shape(1)), r.k = static_cast<int>(r.topk.shape(1));
    GRACE_CHECK_ARG(r.topk.shape(0) == r.R && r.weights.shape(0) == r.R && r.weights.shape(1) == r.k, "recv_x ",
                    shape_str(shape_of(r.x)), ", recv_topk ", shape_str(shape_of(r.topk)), " and recv_weights ",
                    shape_str(shape_of(r.weights)), " must be [R, H], [R, k], [R, k]");
    return r;
}

std::vector<ExpertWeightsView> checked_weights(const py::object& w13, const py::object& w2, int hidden, int slots) {
    auto a = input<float>(w13, "w13", 3, "[S, 2I, H]");
    auto b = input<float>(w2, "w2", 3, "[S, H, I]");
    GRACE_CHECK_ARG(a.shape(2) == hidden, "w13 has hidden size ", a.shape(2), " (shape ", shape_str(shape_of(a)),
                    "), the rows have ", hidden);
    GRACE_CHECK_ARG(slots < 0 || a.shape(0) == slots, "w13 holds ", a.shape(0), " experts, this rank serves ", slots,
                    " (its local experts in the plan)");
    return weight_views(a, b);
}

// grace::MoeLayer (weightless: the caller passes w13/w2) over a HostCommunicator, built at the first dispatch,
// when the hidden size is known.
struct CpuLayer {
    PyCommunicator& comm;
    ExpertPlan plan;
    LayerPlan layer;
    Topology topology;
    MoeLayerOptions options;
    std::unique_ptr<MoeLayer> moe;
    int64_t next_token = 0;  // this rank's tokens so far: the engine policies' per-rank token index

    CpuLayer(PyCommunicator& c, const py::object& plan_obj, int layer_index, const py::object& topo,
             const std::string& scheme, const std::string& policy, uint64_t seed)
        : comm(c), plan(plan_from_py(plan_obj)) {
        GRACE_CHECK_ARG(layer_index >= 0 && layer_index < plan.num_layers, "layer ", layer_index, " is outside [0, ",
                        plan.num_layers, ") (the plan's MoE layers)");
        layer = plan.layers[layer_index];
        topology = topo.is_none() ? plan.topology : topology_from_py(topo);
        GRACE_CHECK_ARG(topology.num_gpus() == static_cast<int>(layer.gpu_experts.size()), "topology ",
                        topology.to_string(), " has ", topology.num_gpus(), " GPUs, the plan's layer ", layer_index,
                        " places experts on ", layer.gpu_experts.size());
        GRACE_CHECK_ARG(topology.num_gpus() == comm.size() && topology.nodes == comm.topology().nodes, "topology ",
                        topology.to_string(), " differs from the communicator's ", comm.topology().to_string());
        options.scheme = parse_comm_scheme(scheme);
        GRACE_CHECK(options.scheme != CommScheme::k2dh, ErrorCode::kUnsupported,
                    "scheme 2dh is priced by the evaluator only; the layer runs flat, flat-dedup and hsc");
        options.policy = parse_routing_policy(policy);
        options.routing_seed = seed;
    }
    const std::vector<int>& local_experts() const { return layer.gpu_experts[comm.rank()]; }

    MoeLayer& layer_for(int hidden) {
        if (!moe) moe = std::make_unique<MoeLayer>(layer, topology, comm, hidden, options);
        GRACE_CHECK_ARG(moe->hidden() == hidden, "x has hidden size ", hidden, ", this layer's first call had ",
                        moe->hidden());
        return *moe;
    }
};

struct PyHandle {
    MoeHandle handle;
    int hidden = 0;
};

py::tuple cpu_dispatch(CpuLayer& L, const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj) {
    auto x = input<float>(x_obj, "x", 2, "[T, H]");
    const TopkIds ids = topk_ids(ids_obj, L.plan.num_experts);
    auto w = input<float>(w_obj, "topk_weights", 2, "[T, k]");
    GRACE_CHECK_ARG(ids.T == x.shape(0) && w.shape(0) == ids.T && w.shape(1) == ids.k, "x ", shape_str(shape_of(x)),
                    ", topk_idx (", ids.T, ", ", ids.k, ") and topk_weights ", shape_str(shape_of(w)),
                    " must be [T, H], [T, k], [T, k]");
    GRACE_CHECK_ARG(x.shape(1) >= 1, "x must have hidden size >= 1, got shape ", shape_str(shape_of(x)));
    auto handle = std::make_unique<PyHandle>();
    MoeReceived rec;
    {
        py::gil_scoped_release release;
        MoeLayer& moe = L.layer_for(static_cast<int>(x.shape(1)));
        handle->handle = moe.dispatch(x.data(), ids.data, w.data(), ids.T, ids.k, rec, L.next_token);
        handle->hidden = moe.hidden();
    }
    L.next_token += ids.T;
    const int64_t R = rec.rows, H = handle->hidden;
    return py::make_tuple(owned(std::move(rec.x), {R, H}), owned(std::move(rec.topk), {R, ids.k}),
                          owned(std::move(rec.weights), {R, ids.k}), py::cast(std::move(handle)));
}

py::array_t<float> cpu_experts(CpuLayer* L, const py::object& recv_x, const py::object& recv_topk,
                               const py::object& recv_weights, const py::object& w13, const py::object& w2) {
    const Rows r = rows_of(recv_x, recv_topk, recv_weights);
    const int slots = L ? static_cast<int>(L->local_experts().size()) : -1;
    const std::vector<ExpertWeightsView> views = checked_weights(w13, w2, r.H, slots);
    std::vector<float> out(static_cast<size_t>(r.R) * r.H);
    {
        py::gil_scoped_release release;
        if (L && L->moe) {
            GRACE_CHECK_ARG(r.H == L->moe->hidden(), "recv_x has hidden size ", r.H, ", the layer has ",
                            L->moe->hidden());
            L->moe->experts(views, r.x.data(), r.topk.data(), r.weights.data(), r.R, r.k, out.data());
        } else {
            std::vector<ExpertWorkspace> ws;
            run_local_experts(views, r.H, r.x.data(), r.topk.data(), r.weights.data(), r.R, r.k, out.data(), ws);
        }
    }
    return owned(std::move(out), {r.R, r.H});
}

py::array_t<float> cpu_combine(CpuLayer& L, const py::object& expert_out, PyHandle& h) {
    GRACE_CHECK_ARG(h.handle.valid(), "combine needs the handle of a dispatch; this one was already combined");
    auto y = input<float>(expert_out, "expert_out", 2, "[R, H]");
    GRACE_CHECK_ARG(y.shape(0) == h.handle.num_rows() && y.shape(1) == h.hidden, "expert_out must have shape (",
                    h.handle.num_rows(), ", ", h.hidden, ") (the dispatch's recv_x), got ", shape_str(shape_of(y)));
    GRACE_CHECK_ARG(L.moe, "combine before any dispatch on this layer");
    const int64_t T = h.handle.num_tokens();
    std::vector<float> out(static_cast<size_t>(T) * h.hidden);
    {
        py::gil_scoped_release release;
        L.moe->combine(y.data(), h.handle, out.data());
    }
    return owned(std::move(out), {T, h.hidden});
}

py::array_t<float> cpu_moe(CpuLayer& L, const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj,
                           const py::object& w13, const py::object& w2) {
    auto x = input<float>(x_obj, "x", 2, "[T, H]");
    const TopkIds ids = topk_ids(ids_obj, L.plan.num_experts);
    auto w = input<float>(w_obj, "topk_weights", 2, "[T, k]");
    GRACE_CHECK_ARG(ids.T == x.shape(0) && w.shape(0) == ids.T && w.shape(1) == ids.k, "x ", shape_str(shape_of(x)),
                    ", topk_idx (", ids.T, ", ", ids.k, ") and topk_weights ", shape_str(shape_of(w)),
                    " must be [T, H], [T, k], [T, k]");
    const int H = static_cast<int>(x.shape(1));
    GRACE_CHECK_ARG(H >= 1, "x must have hidden size >= 1, got shape ", shape_str(shape_of(x)));
    const std::vector<ExpertWeightsView> views =
        checked_weights(w13, w2, H, static_cast<int>(L.local_experts().size()));
    std::vector<float> out(static_cast<size_t>(ids.T) * H);
    {
        py::gil_scoped_release release;
        MoeLayer& moe = L.layer_for(H);
        MoeReceived rec;
        MoeHandle handle = moe.dispatch(x.data(), ids.data, w.data(), ids.T, ids.k, rec, L.next_token);
        std::vector<float> expert_out(static_cast<size_t>(rec.rows) * H);
        moe.experts(views, rec.x.data(), rec.topk.data(), rec.weights.data(), rec.rows, rec.top_k, expert_out.data());
        moe.combine(expert_out.data(), handle, out.data());
    }
    L.next_token += ids.T;
    return owned(std::move(out), {ids.T, H});
}

py::dict stats_dict(const MoeCallStats& s) {
    py::dict d;
    d["routing_s"] = s.routing_s, d["layout_s"] = s.layout_s, d["dispatch_s"] = s.dispatch_s;
    d["expert_s"] = s.expert_s, d["combine_s"] = s.combine_s, d["total_s"] = s.total_s, d["overlap_s"] = s.overlap_s;
    auto bytes = [](const std::array<LinkBytes, 2>& b) {
        py::dict out;
        const char* names[2] = {"intra_node", "cross_node"};
        for (int c = 0; c < 2; ++c) {
            py::dict e;
            e["payload"] = b[c].payload, e["metadata"] = b[c].metadata, e["control"] = b[c].control;
            e["copies"] = b[c].copies;
            out[names[c]] = e;
        }
        return out;
    };
    d["dispatch"] = bytes(s.dispatch);
    d["combine"] = bytes(s.combine);
    d["dispatch_copies_to"] = s.dispatch_copies_to;
    d["local_selections"] = s.local_selections;
    d["expert_rows"] = s.expert_rows;
    return d;
}

void bind_cpu_layer(py::module_& ep) {
    py::class_<PyHandle>(ep, "Handle", "The state of one CpuLayer dispatch (valid for exactly one combine).")
        .def_property_readonly("valid", [](const PyHandle& h) { return h.handle.valid(); })
        .def_property_readonly("num_tokens", [](const PyHandle& h) { return h.handle.num_tokens(); })
        .def_property_readonly("num_rows", [](const PyHandle& h) { return h.handle.num_rows(); });

    py::class_<CpuLayer>(ep, "CpuLayer", R"doc(
grace::MoeLayer of one plan layer over a HostCommunicator, in phases (grace/ep/_cpu.py wraps it for torch tensors).

CpuLayer(comm, plan, layer, topology=None, scheme="hsc", policy="tar", seed=0): plan as a dict or JSON string;
topology "NxM" / (N, M) / None (the plan's). Local slot s = expert local_experts[s] (the plan's list of this rank).
All arrays are C-contiguous NumPy arrays of the exact dtype: x, expert_out float32; topk_idx int64 or int32 (-1 =
none); topk_weights float32; w13 float32 [S, 2I, H]; w2 float32 [S, H, I].
)doc")
        .def(py::init<PyCommunicator&, const py::object&, int, const py::object&, const std::string&,
                      const std::string&, uint64_t>(),
             py::arg("comm"), py::arg("plan"), py::arg("layer"), py::arg("topology") = py::none(),
             py::arg("scheme") = "hsc", py::arg("policy") = "tar", py::arg("seed") = 0, py::keep_alive<1, 2>())
        .def_property_readonly("rank", [](const CpuLayer& L) { return L.comm.rank(); })
        .def_property_readonly("num_experts", [](const CpuLayer& L) { return L.plan.num_experts; })
        .def_property_readonly("local_experts", &CpuLayer::local_experts)
        .def_property_readonly("topology", [](const CpuLayer& L) { return L.topology.to_string(); })
        .def_property_readonly("scheme", [](const CpuLayer& L) { return to_string(L.options.scheme); })
        .def_property_readonly("policy", [](const CpuLayer& L) { return to_string(L.options.policy); })
        .def_property_readonly(
            "hidden", [](const CpuLayer& L) -> py::object { return L.moe ? py::cast(L.moe->hidden()) : py::none(); })
        .def("dispatch", &cpu_dispatch, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             "Collective -> (recv_x [R, H] float32, recv_topk [R, k] int32 local slot or -1, recv_weights [R, k] "
             "float32, Handle).")
        .def(
            "experts",
            [](CpuLayer& L, const py::object& a, const py::object& b, const py::object& c, const py::object& w13,
               const py::object& w2) { return cpu_experts(&L, a, b, c, w13, w2); },
            py::arg("recv_x"), py::arg("recv_topk"), py::arg("recv_weights"), py::arg("w13"), py::arg("w2"),
            "Local -> expert_out [R, H] float32 (w13 must hold this rank's local experts).")
        .def("combine", &cpu_combine, py::arg("expert_out"), py::arg("handle"),
             "Collective -> y [T, H] float32; consumes the handle.")
        .def("moe", &cpu_moe, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("w13"), py::arg("w2"),
             "combine(experts(dispatch(...))) without leaving C++ -> y [T, H] float32.")
        .def(
            "last_dest_ranks",
            [](const CpuLayer& L) {
                GRACE_CHECK_ARG(L.moe, "no dispatch yet");
                std::vector<int32_t> d = L.moe->last_dest_ranks();
                const int64_t n = static_cast<int64_t>(d.size());
                return owned(std::move(d), {n});
            },
            "GPU chosen for every selection of the last dispatch, flat [T * k] int32 (-1 = no selection).")
        .def(
            "last_stats", [](const CpuLayer& L) { return L.moe ? stats_dict(L.moe->last_stats()) : py::dict(); },
            "MoeCallStats of the last call as a dict (times in s; bytes per link class), {} before any call.");

    ep.def(
        "experts",
        [](const py::object& a, const py::object& b, const py::object& c, const py::object& w13, const py::object& w2) {
            return cpu_experts(nullptr, a, b, c, w13, w2);
        },
        py::arg("recv_x"), py::arg("recv_topk"), py::arg("recv_weights"), py::arg("w13"), py::arg("w2"),
        "expert_out [R, H] = sum_j recv_weights[r, j] * SwiGLU_{recv_topk[r, j]}(recv_x[r]) on the given weights "
        "(float32, C-contiguous; no copies).");
}

}  // namespace

void bind_ep(py::module_& m) {
    py::module_ ep = m.def_submodule("_ep", "Expert-parallel layer pieces behind the grace.ep package");
    bind_host_communicator(ep);
    bind_cpu_layer(ep);
}

}  // namespace grace::py_bind
