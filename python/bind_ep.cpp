// grace._grace._ep: the expert-parallel pieces behind the grace.ep package: HostCommunicator (PyCommunicator, a
// grace::Communicator whose collectives call a Python object such as grace.ep._torch_comm.TorchComm).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "bind_common.hpp"
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

}  // namespace

void bind_ep(py::module_& m) {
    py::module_ ep = m.def_submodule("_ep", "Expert-parallel layer pieces behind the grace.ep package");
    bind_host_communicator(ep);
}

}  // namespace grace::py_bind
