#pragma once
// Helpers shared by the binding files: NumPy <-> std::vector with dtype/shape checks that throw grace::Error
// (translated to grace.GraceError, a ValueError), and plan <-> Python dict through the plan's JSON.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "grace/error.hpp"
#include "grace/plan.hpp"
#include "grace/stats.hpp"
#include "grace/topology.hpp"
#include "grace/trace.hpp"

namespace grace::py_bind {

namespace py = pybind11;

/// Shape of a NumPy array as int64.
inline std::vector<int64_t> shape_of(const py::array& a) {
    std::vector<int64_t> s(a.ndim());
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
    return s;
}

inline std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

/// Integer array -> int64 values; throws kInvalidArgument for a non-integer dtype or a rank not in `ranks`.
std::vector<int64_t> int_values(const py::object& obj, const char* name, std::initializer_list<int> ranks,
                                std::vector<int64_t>* shape);
/// Real (float or integer) array -> double values; throws for other dtypes (bool, object, complex, str).
std::vector<double> real_values(const py::object& obj, const char* name, std::initializer_list<int> ranks,
                                std::vector<int64_t>* shape);

/// C-contiguous NumPy array of `shape` holding `data`.
template <typename T>
py::array_t<T> to_array(const std::vector<T>& data, const std::vector<int64_t>& shape) {
    std::vector<py::ssize_t> s(shape.begin(), shape.end());
    py::array_t<T> out(s);
    if (!data.empty()) std::copy(data.begin(), data.end(), out.mutable_data());
    return out;
}

/// Builds an in-memory trace from ids [T, L, k] / [T, k] (integer dtype) and optional weights (float dtype).
RoutingTrace trace_from_arrays(const py::object& ids, int num_experts, const py::object& weights,
                               const std::string& model, const std::string& dataset);
/// {"ids", "weights" (or None), "num_experts", "num_layers", "top_k", "num_tokens", "model", "dataset"}.
py::dict trace_to_dict(const RoutingTrace& trace);

/// Plan <-> dict (the grace.plan/v1 JSON object). from: accepts a dict or a JSON string; validates.
ExpertPlan plan_from_py(const py::object& plan);
py::dict plan_to_py(const ExpertPlan& plan);

/// Stats <-> dict {"num_layers", "num_experts", "top_k", "num_tokens", "model", "dataset", "load" int64 [L, E],
/// "affinity" int64 [L, E, E], "num_gpus", "source_load" int64 [L, G, E] or None}.
RoutingStats stats_from_py(const py::object& stats);
py::dict stats_to_py(const RoutingStats& stats);

/// "NxM" string, (N, M) tuple or None (-> `fallback`).
Topology topology_from_py(const py::object& obj);

void bind_core(py::module_& m);
// Weak: defined by python/bind_stats.cpp etc. when those files are built.
__attribute__((weak)) void bind_stats(py::module_& m);
__attribute__((weak)) void bind_planner(py::module_& m);
__attribute__((weak)) void bind_eval(py::module_& m);
__attribute__((weak)) void bind_engines(py::module_& m);
__attribute__((weak)) void bind_ep(py::module_& m);
__attribute__((weak)) void bind_ep_cuda(py::module_& m);  // python/bind_ep_cuda.cpp, CUDA builds only

}  // namespace grace::py_bind
