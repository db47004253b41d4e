// The CUDA half of grace.ep (python/grace/ep/_cuda.py): the "nccl" communicator over the caller's host
// communicator, grace::cuda::GpuMoeLayer's stream-ordered phases and a stand-alone LocalMoe, on torch tensors
// passed as DLPack capsules (python/dlpack.hpp; borrowed, zero copy) and streams passed as integers
// (torch.cuda.current_stream().cuda_stream). Built into grace._grace only with GRACE_USE_CUDA.
//
// The GIL is held throughout: the host collectives of a call may run Python (the torch.distributed host
// communicator), and every call here is collective anyway.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <tuple>

#include "bind_common.hpp"
#include "dlpack.hpp"
#include "grace/communicator.hpp"
#include "grace/cuda_layer.hpp"
#include "grace/cuda_moe.hpp"
#include "grace/error.hpp"
#include "grace/plan.hpp"
#include "grace/runtime.hpp"
#if __has_include("py_communicator.hpp")
#include "py_communicator.hpp"
#define GRACE_EP_HAVE_PY_COMMUNICATOR 1
#endif

namespace grace::py_bind {

namespace {

namespace dl = dlpack;

void check_cuda(cudaError_t err, const char* what) {
    GRACE_CHECK(err == cudaSuccess, ErrorCode::kBackend, "CUDA error ", cudaGetErrorName(err), " (",
                cudaGetErrorString(err), ") in ", what);
}

// Makes `device` current for the scope (torch's current device may be another one) and restores the previous.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceGuard() { cudaSetDevice(previous_); }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int previous_ = 0;
};

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// The device communicator of one grace.ep Buffer and the CUDA device it was built on.
struct EpNccl {
    std::shared_ptr<Communicator> host;
    std::unique_ptr<Communicator> comm;
    int device = 0;
};

std::shared_ptr<EpNccl> make_ep_nccl(const py::object& topology, int device, double timeout_s,
                                     const py::object& host_impl) {
    CommunicatorOptions options;
    options.topology = topology_from_py(topology);
    options.timeout_s = timeout_s;
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    GRACE_CHECK(count >= 1, ErrorCode::kUnsupported, "grace.ep CUDA backend: no CUDA device");
    GRACE_CHECK_ARG(device >= 0 && device < count, "grace.ep CUDA backend: device ", device, " outside [0, ", count,
                    ")");
    auto ep = std::make_shared<EpNccl>();
    ep->device = device;
    if (host_impl.is_none()) {
        GRACE_CHECK_ARG(options.topology.num_gpus() == 1, "grace.ep CUDA backend: topology ",
                        options.topology.to_string(), " needs a host communicator over the process group");
        ep->host = make_communicator("local", options);
    } else {
#ifdef GRACE_EP_HAVE_PY_COMMUNICATOR
        ep->host = std::make_shared<PyCommunicator>(host_impl, options);
#else
        GRACE_CHECK(false, ErrorCode::kUnsupported,
                    "grace.ep CUDA backend: this build has no torch.distributed host communicator "
                    "(python/py_communicator.cpp)");
#endif
    }
    DeviceGuard guard(device);
    ep->comm = cuda::make_nccl_communicator(options, ep->host, device);
    return ep;
}

// A dispatch handle as Python sees it (opaque plus a few read-only fields).
struct PyHandle {
    cuda::GpuDispatchHandle h;
};

struct EpLayer {
    std::shared_ptr<EpNccl> nccl;  // outlives the layer (declared first, destroyed last)
    std::unique_ptr<cuda::GpuMoeLayer> layer;
    int H = 0, I = 0, E = 0, S = 0;
    py::object w13_ref, w2_ref;  // the registered weights' capsules, kept alive while in use

    // workspace: scratch shared with the other layers given the same one (nullptr: the layer's own).
    EpLayer(std::shared_ptr<EpNccl> n, const py::object& plan_obj, int layer_index, int hidden, int intermediate,
            const std::string& scheme, const std::string& policy, uint64_t seed,
            std::shared_ptr<cuda::GpuWorkspace> workspace)
        : nccl(std::move(n)), H(hidden), I(intermediate) {
        GRACE_CHECK_ARG(nccl && nccl->comm, "grace.ep CUDA layer: no communicator");
        const ExpertPlan plan = plan_from_py(plan_obj);
        GRACE_CHECK_ARG(layer_index >= 0 && layer_index < static_cast<int>(plan.layers.size()), "layer ", layer_index,
                        " outside the plan's [0, ", plan.layers.size(), ")");
        const Topology& topo = nccl->comm->topology();
        GRACE_CHECK_ARG(plan.topology.num_gpus() == topo.num_gpus(), "plan for ", plan.topology.to_string(), " (",
                        plan.topology.num_gpus(), " GPUs) but the group runs ", topo.to_string());
        E = plan.num_experts;
        const auto& gpu_experts = plan.layers[layer_index].gpu_experts;
        GRACE_CHECK_ARG(static_cast<int>(gpu_experts.size()) == topo.num_gpus(), "plan layer ", layer_index,
                        " places experts on ", gpu_experts.size(), " GPUs, the group has ", topo.num_gpus());
        S = static_cast<int>(gpu_experts[nccl->comm->rank()].size());
        cuda::GpuMoeLayerOptions o;
        o.scheme = parse_comm_scheme(scheme);
        o.policy = parse_routing_policy(policy);
        o.routing_seed = seed;
        o.workspace = std::move(workspace);
        DeviceGuard guard(nccl->device);
        layer =
            std::make_unique<cuda::GpuMoeLayer>(plan.layers[layer_index], topo, *nccl->comm, hidden, intermediate, o);
    }

    int dev() const { return nccl->device; }

    // w13 [S, 2I, H], w2 [S, H, I] bf16; I is taken from w13 (the layer may have been built before it was known).
    void set_expert_weights(const py::object& w13, const py::object& w2) {
        const auto a = dl::import_cuda(w13, "w13", dl::kBFloat16, dev(), {S, -1, H}, 16);
        GRACE_CHECK_ARG(a.shape[1] > 0 && a.shape[1] % 16 == 0, "w13: shape ", dl::shape_string(a.shape),
                        ", dimension 1 (2I) must be a positive multiple of 16");
        const int inter = static_cast<int>(a.shape[1] / 2);
        const auto b = dl::import_cuda(w2, "w2", dl::kBFloat16, dev(), {S, H, inter}, 16);
        DeviceGuard guard(dev());
        layer->set_expert_weights(a.data, b.data, inter);
        I = inter;
        w13_ref = w13, w2_ref = w2;
    }

    // x [T, H] bf16, ids [T, k] int32 or int64 (torch's index dtype, narrowed on the device by the layer),
    // weights [T, k] float32.
    struct Inputs {
        dl::TensorView x, ids, w;
        bool ids64 = false;
        const int32_t* ids32() const { return ids64 ? nullptr : static_cast<const int32_t*>(ids.data); }
        const int64_t* ids_64() const { return ids64 ? static_cast<const int64_t*>(ids.data) : nullptr; }
    };
    Inputs inputs(const py::object& x, const py::object& ids, const py::object& w) const {
        Inputs in;
        in.x = dl::import_cuda(x, "x", dl::kBFloat16, dev(), {-1, H}, 16);
        const auto id_type = dl::dtype_of(ids, dl::kInt32);
        GRACE_CHECK_ARG(id_type == dl::kInt32 || id_type == dl::kInt64, "topk_idx: dtype ", dl::dtype_name(id_type),
                        ", expected int32 or int64");
        in.ids64 = id_type == dl::kInt64;
        in.ids = dl::import_cuda(ids, "topk_idx", in.ids64 ? dl::kInt64 : dl::kInt32, dev(), {in.x.shape[0], -1});
        GRACE_CHECK_ARG(in.ids.shape[1] >= 1, "topk_idx: shape ", dl::shape_string(in.ids.shape),
                        ", k must be >= 1");
        in.w = dl::import_cuda(w, "topk_weights", dl::kFloat32, dev(), {in.x.shape[0], in.ids.shape[1]});
        return in;
    }

    PyHandle dispatch(const py::object& x, const py::object& ids, const py::object& w, uintptr_t stream,
                      int64_t first_token) {
        const Inputs in = inputs(x, ids, w);
        DeviceGuard guard(dev());
        const auto* wp = static_cast<const float*>(in.w.data);
        const int k = static_cast<int>(in.ids.shape[1]);
        return PyHandle{in.ids64 ? layer->dispatch(in.x.data, in.ids_64(), wp, in.x.shape[0], k, as_stream(stream),
                                                   first_token)
                                 : layer->dispatch(in.x.data, in.ids32(), wp, in.x.shape[0], k, as_stream(stream),
                                                   first_token)};
    }

    void received(const PyHandle& h, const py::object& rx, const py::object& rs, const py::object& rw,
                  uintptr_t stream) {
        const int64_t R = h.h.num_recv, k = h.h.top_k;
        auto vx = dl::import_cuda(rx, "recv_x", dl::kBFloat16, dev(), {R, H}, 16);
        auto vs = dl::import_cuda(rs, "recv_topk", dl::kInt32, dev(), {R, k});
        auto vw = dl::import_cuda(rw, "recv_weights", dl::kFloat32, dev(), {R, k});
        DeviceGuard guard(dev());
        layer->received(h.h, vx.data, static_cast<int32_t*>(vs.data), static_cast<float*>(vw.data), as_stream(stream));
    }

    void experts(PyHandle& h, uintptr_t stream) {
        DeviceGuard guard(dev());
        layer->experts(h.h, as_stream(stream));
    }

    void combine(PyHandle& h, const py::object& expert_out, const py::object& out, uintptr_t stream) {
        const void* partials = nullptr;
        if (!expert_out.is_none())
            partials = dl::import_cuda(expert_out, "expert_out", dl::kBFloat16, dev(), {h.h.num_recv, H}, 16).data;
        auto vo = dl::import_cuda(out, "out", dl::kFloat32, dev(), {h.h.num_tokens, H}, 16);
        DeviceGuard guard(dev());
        layer->combine(h.h, partials, static_cast<float*>(vo.data), as_stream(stream));
    }

    void forward_async(const py::object& x, const py::object& ids, const py::object& w, const py::object& out,
                       uintptr_t stream, int64_t first_token) {
        const Inputs in = inputs(x, ids, w);
        auto vo = dl::import_cuda(out, "out", dl::kFloat32, dev(), {in.x.shape[0], H}, 16);
        DeviceGuard guard(dev());
        const auto* wp = static_cast<const float*>(in.w.data);
        const int k = static_cast<int>(in.ids.shape[1]);
        auto* op = static_cast<float*>(vo.data);
        if (in.ids64)
            layer->forward_async(in.x.data, in.ids_64(), wp, in.x.shape[0], k, op, as_stream(stream), first_token);
        else
            layer->forward_async(in.x.data, in.ids32(), wp, in.x.shape[0], k, op, as_stream(stream), first_token);
    }

    // The synchronous C++ path (legacy stream, device synchronized), for bit-for-bit checks of the binding.
    void forward_device(const py::object& x, const py::object& ids, const py::object& w, const py::object& out,
                        int64_t first_token) {
        const Inputs in = inputs(x, ids, w);
        GRACE_CHECK_ARG(!in.ids64, "forward_device: topk_idx must be int32 (the reference path takes no int64)");
        auto vo = dl::import_cuda(out, "out", dl::kFloat32, dev(), {in.x.shape[0], H}, 16);
        DeviceGuard guard(dev());
        layer->forward_device(in.x.data, in.ids32(), static_cast<const float*>(in.w.data), in.x.shape[0],
                              static_cast<int>(in.ids.shape[1]), static_cast<float*>(vo.data), first_token);
    }
};

// grace.ep.experts on CUDA tensors: a LocalMoe per (S, k, H, I), grown as needed, over the caller's weights.
struct EpExperts {
    std::map<std::tuple<int, int, int, int, int>, std::pair<int, std::unique_ptr<cuda::LocalMoe>>> cache;

    void run(const py::object& x, const py::object& slots, const py::object& weights, const py::object& w13,
             const py::object& w2, const py::object& out, uintptr_t stream) {
        const auto vx = dl::import_cuda(x, "recv_x", dl::kBFloat16, dl::cuda_device_of(x, "recv_x"), {-1, -1}, 16);
        const int dev = vx.device_id;
        const int64_t R = vx.shape[0], H = vx.shape[1];
        const auto vs = dl::import_cuda(slots, "recv_topk", dl::kInt32, dev, {R, -1});
        const int64_t k = vs.shape[1];
        const auto vw = dl::import_cuda(weights, "recv_weights", dl::kFloat32, dev, {R, k});
        const auto a = dl::import_cuda(w13, "w13", dl::kBFloat16, dev, {-1, -1, H}, 16);
        const int64_t S = a.shape[0], I2 = a.shape[1];
        GRACE_CHECK_ARG(I2 % 2 == 0, "w13: shape ", dl::shape_string(a.shape), ", dimension 1 (2I) must be even");
        const auto b = dl::import_cuda(w2, "w2", dl::kBFloat16, dev, {S, H, I2 / 2}, 16);
        const auto vo = dl::import_cuda(out, "expert_out", dl::kBFloat16, dev, {R, H}, 16);
        GRACE_CHECK_ARG(k >= 1 && S >= 1, "experts: k ", k, ", S ", S, " must be >= 1");
        GRACE_CHECK_ARG(H % 8 == 0 && (I2 / 2) % 8 == 0 && H > 0 && I2 > 0, "experts: H ", H, " and I ", I2 / 2,
                        " must be positive multiples of 8");
        GRACE_CHECK_ARG(R < (int64_t{1} << 31) / std::max<int64_t>(1, k), "experts: ", R, " rows");
        if (R == 0) return;
        DeviceGuard guard(dev);
        auto& entry =
            cache[{dev, static_cast<int>(S), static_cast<int>(k), static_cast<int>(H), static_cast<int>(I2 / 2)}];
        if (!entry.second || entry.first < R) {
            entry.second.reset();
            entry.first = static_cast<int>(std::max<int64_t>(R, 2 * static_cast<int64_t>(entry.first)));
            entry.second =
                std::make_unique<cuda::LocalMoe>(cuda::LocalMoeShape{static_cast<int>(S), static_cast<int>(k),
                                                                     static_cast<int>(H), static_cast<int>(I2 / 2)},
                                                 entry.first);
        }
        entry.second->set_weights(a.data, b.data);
        entry.second->forward(vx.data, static_cast<const int32_t*>(vs.data), static_cast<const float*>(vw.data),
                              vo.data, static_cast<int>(R), as_stream(stream));
    }
};

}  // namespace

void bind_ep_cuda(py::module_& top) {
    // Beside the host pieces of bind_ep.cpp, in grace._grace._ep.
    py::module_ m = py::hasattr(top, "_ep") ? top.attr("_ep").cast<py::module_>()
                                            : top.def_submodule("_ep", "Expert-parallel layer pieces behind grace.ep");
    m.attr("cuda_available") = true;
    py::class_<EpNccl, std::shared_ptr<EpNccl>>(m, "NcclCommunicator",
                                                "The 'nccl' communicator of a grace.ep Buffer (grace/ep/_cuda.py).")
        .def(py::init(&make_ep_nccl), py::arg("topology"), py::arg("device"), py::arg("timeout_s") = 300.0,
             py::arg("host_impl") = py::none(),
             "Collective. host_impl: the torch.distributed host communicator object (None: a world of one).")
        .def_property_readonly("rank", [](const EpNccl& e) { return e.comm->rank(); })
        .def_property_readonly("size", [](const EpNccl& e) { return e.comm->size(); })
        .def_property_readonly("device", [](const EpNccl& e) { return e.device; });

    py::class_<cuda::GpuWorkspace, std::shared_ptr<cuda::GpuWorkspace>>(
        m, "GpuWorkspace",
        "Device scratch shared by the GpuLayers given it (one device; used by one layer's call at a time, from "
        "dispatch to combine). Construction does no CUDA work.")
        .def(py::init<>())
        .def_property_readonly("buffer_bytes", &cuda::GpuWorkspace::buffer_bytes,
                               "device bytes of its exchange, routing and accumulator buffers (LocalMoe's not "
                               "counted)")
        .def_property_readonly("in_use", &cuda::GpuWorkspace::in_use, "True while a layer's dispatch is open on it");

    py::class_<PyHandle>(m, "GpuDispatchHandle", "An open dispatch of a GpuLayer (valid for one combine).")
        .def_property_readonly("num_tokens", [](const PyHandle& h) { return h.h.num_tokens; })
        .def_property_readonly("top_k", [](const PyHandle& h) { return h.h.top_k; })
        .def_property_readonly("num_recv", [](const PyHandle& h) { return h.h.num_recv; })
        .def_property_readonly("records", [](const PyHandle& h) { return h.h.records; })
        .def_property_readonly("open", [](const PyHandle& h) { return h.h.call != 0; });

    py::class_<EpLayer>(m, "GpuLayer", "grace::cuda::GpuMoeLayer over DLPack capsules (grace/ep/_cuda.py).")
        .def(py::init<std::shared_ptr<EpNccl>, const py::object&, int, int, int, const std::string&, const std::string&,
                      uint64_t, std::shared_ptr<cuda::GpuWorkspace>>(),
             py::arg("comm"), py::arg("plan"), py::arg("layer"), py::arg("hidden"), py::arg("intermediate") = 0,
             py::arg("scheme") = "hsc", py::arg("policy") = "tar", py::arg("seed") = 0,
             py::arg("workspace") = py::none())
        .def_readonly("num_local_experts", &EpLayer::S)
        .def_readonly("num_experts", &EpLayer::E)
        .def_readonly("hidden", &EpLayer::H)
        .def_readonly("intermediate", &EpLayer::I)
        .def("set_expert_weights", &EpLayer::set_expert_weights, py::arg("w13"), py::arg("w2"))
        .def("dispatch", &EpLayer::dispatch, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             py::arg("stream"), py::arg("first_token") = 0)
        .def("received", &EpLayer::received, py::arg("handle"), py::arg("recv_x"), py::arg("recv_topk"),
             py::arg("recv_weights"), py::arg("stream"))
        .def("experts", &EpLayer::experts, py::arg("handle"), py::arg("stream"))
        .def("combine", &EpLayer::combine, py::arg("handle"), py::arg("expert_out"), py::arg("out"), py::arg("stream"))
        .def("forward_async", &EpLayer::forward_async, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             py::arg("out"), py::arg("stream"), py::arg("first_token") = 0)
        .def(
            "set_host_id_check", [](EpLayer& l, bool on) { l.layer->set_host_id_check(on); }, py::arg("on"),
            "GpuMoeLayer::set_host_id_check: off = the one-GPU path waits for nothing on the host (ids >= E then "
            "select no expert, unreported)")
        .def("forward_device", &EpLayer::forward_device, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
             py::arg("out"), py::arg("first_token") = 0)
        .def("last_dest_ranks",
             [](const EpLayer& l) {
                 const auto& d = l.layer->last_dest_ranks();
                 return to_array(d, {static_cast<int64_t>(d.size())});
             })
        .def("last_stats", [](const EpLayer& l) {
            const MoeCallStats& s = l.layer->last_stats();
            py::dict d;
            d["routing_s"] = s.routing_s, d["layout_s"] = s.layout_s, d["dispatch_s"] = s.dispatch_s;
            d["expert_s"] = s.expert_s, d["combine_s"] = s.combine_s, d["total_s"] = s.total_s;
            d["local_selections"] = s.local_selections;
            return d;
        });

    py::class_<EpExperts>(m, "GpuExperts", "grace.ep.experts on CUDA tensors (LocalMoe over the caller's weights).")
        .def(py::init<>())
        .def("run", &EpExperts::run, py::arg("recv_x"), py::arg("recv_topk"), py::arg("recv_weights"), py::arg("w13"),
             py::arg("w2"), py::arg("out"), py::arg("stream"));
}

}  // namespace grace::py_bind
