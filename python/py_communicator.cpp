#include "py_communicator.hpp"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "grace/error.hpp"

namespace grace::py_bind {

namespace py = pybind11;

namespace {

const char* group_name(CommGroup group) { return group == CommGroup::kGlobal ? "global" : "node"; }

// A 1-D NumPy array viewing `n` elements at `p` (no copy; the caller keeps the memory alive). The capsule base
// stops NumPy from copying or freeing; a null `p` (empty std::vector) is replaced by a static byte.
template <typename T>
py::array_t<T> view(const void* p, size_t n) {
    static T dummy{};
    T* data = p ? static_cast<T*>(const_cast<void*>(p)) : &dummy;
    py::capsule base(data, [](void*) {});
    return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, data, base);
}

py::list to_list(const std::vector<size_t>& v) {
    py::list out;
    for (size_t x : v) out.append(x);
    return out;
}

// The first line of the pending Python exception's str() ("Timed out waiting 5000ms for recv ...").
std::string first_line(const py::error_already_set& e) {
    std::string text;
    try {
        text = py::str(e.value()).cast<std::string>();
    } catch (...) {
        text = e.what();
    }
    if (text.empty()) text = py::str(e.type().attr("__name__")).cast<std::string>();
    const size_t nl = text.find('\n');
    return nl == std::string::npos ? text : text.substr(0, nl);
}

[[noreturn]] void throw_backend(const std::string& what, int rank, const py::error_already_set& e) {
    throw Error(ErrorCode::kBackend, cat("host communicator: ", what, " failed on rank ", rank, ": ", first_line(e)));
}

// A started alltoallv: holds the Python pending object until wait().
class PyRequest final : public CommRequest {
  public:
    PyRequest(PyCommunicator& comm, CommGroup group, py::object pending)
        : comm_(comm), group_(group), pending_(std::move(pending)) {}
    ~PyRequest() override {
        if (!pending_) return;
        try {
            wait();
        } catch (const std::exception& e) {
            // A started collective must complete on every rank; one that cannot ends the job (no throw here).
            comm_.abort(70, cat("grace: error: ", e.what()));
        }
    }
    void wait() override {
        if (!pending_) return;
        py::gil_scoped_acquire gil;
        py::object pending = std::move(pending_);  // leaves pending_ empty: wait() completes once
        try {
            pending.attr("wait")();
        } catch (py::error_already_set& e) {
            throw_backend(cat("alltoallv on the ", group_name(group_), " group"), comm_.rank(), e);
        }
    }

  private:
    PyCommunicator& comm_;
    CommGroup group_;
    py::object pending_;
};

int int_attr(const py::object& impl, const char* name) {
    GRACE_CHECK_ARG(py::hasattr(impl, name), "host communicator object ", py::str(impl.get_type()).cast<std::string>(),
                    " has no attribute '", name, "'");
    return impl.attr(name).cast<int>();
}

}  // namespace

PyCommunicator::PyCommunicator(py::object impl, const CommunicatorOptions& options)
    : Communicator(options.topology, 0, options.timeout_s), impl_(std::move(impl)) {
    options.topology.validate();
    GRACE_CHECK_ARG(std::isfinite(options.timeout_s) && options.timeout_s >= 0, "communicator timeout ",
                    options.timeout_s, " s must be finite and >= 0 (0 = no deadline)");
    py::gil_scoped_acquire gil;
    const int size = int_attr(impl_, "size");
    rank_ = int_attr(impl_, "rank");
    GRACE_CHECK_ARG(size == options.topology.num_gpus(), "topology ", options.topology.to_string(), " needs ",
                    options.topology.num_gpus(), " processes, the group has ", size);
    GRACE_CHECK_ARG(rank_ >= 0 && rank_ < size, "host communicator rank ", rank_, " is outside [0, ", size, ")");
    name_ = py::hasattr(impl_, "name") ? py::str(impl_.attr("name")).cast<std::string>() : "python";
}

PyCommunicator::~PyCommunicator() {
    if (!Py_IsInitialized()) {  // interpreter already gone: leak the reference rather than touch Python
        impl_.release();
        return;
    }
    py::gil_scoped_acquire gil;
    impl_ = py::object();
}

std::string PyCommunicator::host() const { return host_name(); }

std::unique_ptr<CommRequest> PyCommunicator::start_alltoallv(CommGroup group, const void* send, void* recv,
                                                             const AlltoallvLayout& layout) {
    const int n = group_size(group);
    GRACE_CHECK_ARG(layout.send_counts.size() == static_cast<size_t>(n) &&
                        layout.send_displs.size() == layout.send_counts.size() &&
                        layout.recv_counts.size() == layout.send_counts.size() &&
                        layout.recv_displs.size() == layout.send_counts.size(),
                    "alltoallv layout has ", layout.send_counts.size(), "/", layout.send_displs.size(), "/",
                    layout.recv_counts.size(), "/", layout.recv_displs.size(), " entries for a group of ", n);
    size_t send_end = 0, recv_end = 0;
    for (int q = 0; q < n; ++q) {
        send_end = std::max(send_end, layout.send_displs[q] + layout.send_counts[q]);
        recv_end = std::max(recv_end, layout.recv_displs[q] + layout.recv_counts[q]);
    }
    py::gil_scoped_acquire gil;
    py::object pending;
    try {
        pending = impl_.attr("alltoallv")(group_name(group), view<uint8_t>(send, send_end), to_list(layout.send_counts),
                                          to_list(layout.send_displs), view<uint8_t>(recv, recv_end),
                                          to_list(layout.recv_counts), to_list(layout.recv_displs));
    } catch (py::error_already_set& e) {
        throw_backend(cat("alltoallv on the ", group_name(group), " group"), rank_, e);
    }
    return std::make_unique<PyRequest>(*this, group, std::move(pending));
}

std::vector<uint64_t> PyCommunicator::exchange_counts(CommGroup group, const std::vector<uint64_t>& send,
                                                      const std::vector<uint8_t>& peers) {
    const int n = group_size(group);
    GRACE_CHECK_ARG(static_cast<int>(send.size()) == n && static_cast<int>(peers.size()) == n, "exchange_counts has ",
                    send.size(), " counts and ", peers.size(), " peer flags for a group of ", n);
    AlltoallvLayout layout;
    for (int q = 0; q < n; ++q) {
        const size_t bytes = peers[q] ? 8 : 0;
        layout.send_counts.push_back(bytes);
        layout.recv_counts.push_back(bytes);
        layout.send_displs.push_back(static_cast<size_t>(q) * 8);
        layout.recv_displs.push_back(static_cast<size_t>(q) * 8);
    }
    std::vector<uint64_t> out(n, 0);
    alltoallv(group, send.data(), out.data(), layout);
    return out;
}

std::vector<uint64_t> PyCommunicator::allgather(uint64_t value) {
    const std::vector<uint8_t> bytes = allgather_bytes(&value, sizeof(value));
    std::vector<uint64_t> out(size());
    std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
}

std::vector<uint8_t> PyCommunicator::allgather_bytes(const void* data, size_t bytes) {
    std::vector<uint8_t> out(static_cast<size_t>(size()) * bytes);
    py::gil_scoped_acquire gil;
    try {
        py::object got = impl_.attr("allgather_bytes")(view<uint8_t>(data, bytes));
        auto arr = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(got);
        GRACE_CHECK(arr && static_cast<size_t>(arr.size()) == out.size(), ErrorCode::kBackend,
                    "host communicator: allgather_bytes returned ", arr ? arr.size() : -1, " bytes, expected ",
                    out.size());
        if (!out.empty()) std::memcpy(out.data(), arr.data(), out.size());
    } catch (py::error_already_set& e) {
        throw_backend("allgather", rank_, e);
    }
    return out;
}

void PyCommunicator::allreduce(std::vector<double>& values, const char* op) {
    py::gil_scoped_acquire gil;
    try {
        impl_.attr("allreduce")(view<double>(values.data(), values.size()), op);
    } catch (py::error_already_set& e) {
        throw_backend(cat("allreduce (", op, ")"), rank_, e);
    }
}

void PyCommunicator::allreduce_sum(std::vector<double>& values) { allreduce(values, "sum"); }
void PyCommunicator::allreduce_max(std::vector<double>& values) { allreduce(values, "max"); }

void PyCommunicator::barrier() {
    py::gil_scoped_acquire gil;
    try {
        impl_.attr("barrier")();
    } catch (py::error_already_set& e) {
        throw_backend("barrier", rank_, e);
    }
}

void PyCommunicator::abort(int code, const std::string& message) {
    {
        py::gil_scoped_acquire gil;
        try {
            impl_.attr("abort")(code, message);
        } catch (...) {  // fall through to the local exit below
        }
    }
    std::fprintf(stderr, "%s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(code);
}

}  // namespace grace::py_bind
