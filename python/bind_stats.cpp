// Bindings of the profiler and statistics I/O (`grace profile`, `grace import-stats`).
#include "bind_common.hpp"

namespace grace::py_bind {

RoutingStats stats_from_py(const py::object& obj) {
    GRACE_CHECK_ARG(py::isinstance<py::dict>(obj), "stats must be a dict (as grace.profile returns), got ",
                    py::str(obj.get_type()).cast<std::string>());
    py::dict d = py::reinterpret_borrow<py::dict>(obj);
    GRACE_CHECK_ARG(d.contains("load") && d.contains("affinity"),
                    "stats dict needs 'load' [L, E] and 'affinity' [L, E, E]");
    RoutingStats st;
    std::vector<int64_t> ls, as;
    st.load = int_values(d["load"], "stats['load']", {2}, &ls);
    st.affinity = int_values(d["affinity"], "stats['affinity']", {3}, &as);
    st.num_layers = static_cast<int>(ls[0]);
    st.num_experts = static_cast<int>(ls[1]);
    GRACE_CHECK_ARG(as[0] == ls[0] && as[1] == ls[1] && as[2] == ls[1], "stats['affinity'] must be [L, E, E] = [",
                    ls[0], ", ", ls[1], ", ", ls[1], "], got ", shape_str(as));
    auto get_int = [&](const char* k, int64_t def) { return d.contains(k) ? d[k].cast<int64_t>() : def; };
    auto get_str = [&](const char* k) { return d.contains(k) ? d[k].cast<std::string>() : std::string(); };
    st.top_k = static_cast<int>(get_int("top_k", 0));
    st.num_tokens = get_int("num_tokens", 0);
    st.model = get_str("model");
    st.dataset = get_str("dataset");
    if (d.contains("source_load") && !d["source_load"].is_none()) {
        std::vector<int64_t> ss;
        st.source_load = int_values(d["source_load"], "stats['source_load']", {3}, &ss);
        GRACE_CHECK_ARG(ss[0] == ls[0] && ss[2] == ls[1], "stats['source_load'] must be [L, G, E], got ",
                        shape_str(ss));
        st.num_gpus = static_cast<int>(ss[1]);
    }
    // Per-window loads (grace profile --window-tokens), used by plan(robust=q).
    if (d.contains("window_load") && !d["window_load"].is_none()) {
        std::vector<int64_t> ws, cs;
        st.window_tokens = get_int("window_tokens", 0);
        st.window_load = int_values(d["window_load"], "stats['window_load']", {3}, &ws);
        GRACE_CHECK_ARG(ws[0] == ls[0] && ws[2] == ls[1] && d.contains("window_counts"),
                        "stats['window_load'] must be [L, windows, E] with stats['window_counts'] [windows], got ",
                        shape_str(ws));
        st.window_counts = int_values(d["window_counts"], "stats['window_counts']", {1}, &cs);
        st.window_weight = d.contains("window_weight") && !d["window_weight"].is_none()
                               ? real_values(d["window_weight"], "stats['window_weight']", {1}, nullptr)
                               : std::vector<double>(st.window_counts.size(), 1.0);
    }
    st.validate();
    return st;
}

py::dict stats_to_py(const RoutingStats& st) {
    py::dict d;
    d["num_layers"] = st.num_layers;
    d["num_experts"] = st.num_experts;
    d["top_k"] = st.top_k;
    d["num_tokens"] = st.num_tokens;
    d["model"] = st.model;
    d["dataset"] = st.dataset;
    d["load"] = to_array(st.load, {st.num_layers, st.num_experts});
    d["affinity"] = to_array(st.affinity, {st.num_layers, st.num_experts, st.num_experts});
    d["num_gpus"] = st.num_gpus;
    d["source_load"] = st.num_gpus > 0
                           ? py::object(to_array(st.source_load, {st.num_layers, st.num_gpus, st.num_experts}))
                           : py::none();
    d["window_tokens"] = st.window_tokens;
    const int64_t W = st.num_windows();
    d["window_load"] =
        st.window_tokens > 0 ? py::object(to_array(st.window_load, {st.num_layers, W, st.num_experts})) : py::none();
    d["window_counts"] = st.window_tokens > 0 ? py::object(to_array(st.window_counts, {W})) : py::none();
    d["window_weight"] = st.window_tokens > 0 ? py::object(to_array(st.window_weight, {W})) : py::none();
    return d;
}

void bind_stats(py::module_& m) {
    m.def(
        "profile",
        [](const py::object& ids, int num_experts, const py::object& topology, int threads, const std::string& model,
           const std::string& dataset, int64_t window_tokens) {
            const RoutingTrace trace = trace_from_arrays(ids, num_experts, py::none(), model, dataset);
            ProfileOptions opt;
            opt.num_threads = threads;
            opt.window_tokens = window_tokens;
            if (!topology.is_none()) opt.topology = topology_from_py(topology);
            RoutingStats st;
            {
                py::gil_scoped_release release;
                st = profile_trace(trace, opt);
            }
            return stats_to_py(st);
        },
        py::arg("ids"), py::arg("num_experts"), py::arg("topology") = py::none(), py::arg("threads") = 0,
        py::arg("model") = "", py::arg("dataset") = "", py::arg("window_tokens") = 0,
        "Profiles ids [T, L, k] (spec §2): dict with 'load' int64 [L, E], 'affinity' int64 [L, E, E] (unordered "
        "pairs), 'source_load' int64 [L, G, E] with a topology (else None) and the sizes; as `grace profile`. "
        "window_tokens > 0 adds 'window_load' int64 [L, windows, E], 'window_counts' int64 [windows] and "
        "'window_weight' float64 [windows] (as `grace profile --window-tokens`; else None).");
    m.def(
        "profile_file",
        [](const std::string& path, std::optional<int> num_experts, const py::object& topology, int threads,
           int64_t window_tokens) {
            TraceOverrides ov;
            ov.num_experts = num_experts;
            ProfileOptions opt;
            opt.num_threads = threads;
            opt.window_tokens = window_tokens;
            if (!topology.is_none()) opt.topology = topology_from_py(topology);
            py::gil_scoped_release release;
            RoutingStats st = profile_trace_file(path, ov, opt);
            py::gil_scoped_acquire acquire;
            return stats_to_py(st);
        },
        py::arg("path"), py::arg("num_experts") = py::none(), py::arg("topology") = py::none(), py::arg("threads") = 0,
        py::arg("window_tokens") = 0, "Profiles a trace file by streaming it (what `grace profile TRACE` computes).");
    m.def(
        "save_stats", [](const py::object& stats, const std::string& dir) { save_stats(stats_from_py(stats), dir); },
        py::arg("stats"), py::arg("dir"), "Writes a statistics dict as a grace.stats/v1 folder.");
    m.def(
        "load_stats", [](const std::string& dir) { return stats_to_py(load_stats(dir)); }, py::arg("dir"),
        "Reads a grace.stats/v1 folder as a dict.");
    m.def(
        "stats_from_aggregates",
        [](const py::object& coactivation, const py::object& load, bool ordered_pairs, int top_k) {
            std::vector<int64_t> cs, ls;
            std::vector<double> c = real_values(coactivation, "coactivation", {2, 3}, &cs);
            std::vector<double> l;
            if (!load.is_none()) l = real_values(load, "load", {1, 2}, &ls);
            return stats_to_py(stats_from_aggregates(c, cs, l, ls, ordered_pairs, top_k));
        },
        py::arg("coactivation"), py::arg("load") = py::none(), py::arg("ordered_pairs") = false, py::arg("top_k") = 0,
        "Statistics from aggregated co-activation [L, E, E] (or [E, E]) and loads [L, E] (as `grace import-stats`).");
}

}  // namespace grace::py_bind
