#include "grace/stats.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <future>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/json_read.hpp"
#include "core/limits.hpp"
#include "core/profile_kernels.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/npy.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace grace {

namespace {

/// Fills affinity (symmetric, zero diagonal) and loads from the counter's upper-triangle pairs.
void finish_stats(const detail::PairCounter& counter, RoutingStats& st) {
    const int L = st.num_layers, E = st.num_experts, k = st.top_k;
    const size_t ee = static_cast<size_t>(E) * E;
    st.affinity = counter.upper_pairs();
    st.load.assign(static_cast<size_t>(L) * E, 0);
    if (k >= 2) {
        for (int l = 0; l < L; ++l) {
            int64_t* a = st.affinity.data() + l * ee;
            for (int i = 0; i < E; ++i)
                for (int j = i + 1; j < E; ++j) a[static_cast<size_t>(j) * E + i] = a[static_cast<size_t>(i) * E + j];
            // Every token holding i pairs i with exactly k-1 others, so l_i = (sum_j A_ij) / (k-1), exactly.
            for (int i = 0; i < E; ++i) {
                int64_t row = 0;
                for (int j = 0; j < E; ++j) row += a[static_cast<size_t>(i) * E + j];
                GRACE_ASSERT(row % (k - 1) == 0);
                st.load[static_cast<size_t>(l) * E + i] = row / (k - 1);
            }
        }
    } else {
        st.load = counter.direct_load();
    }
    st.source_load = counter.source_load();
}

ProfileOptions checked(const ProfileOptions& o) {
    GRACE_CHECK_ARG(o.num_threads >= 0, "number of threads must be >= 0 (0 = all), got ", o.num_threads);
    GRACE_CHECK_ARG(o.window_tokens >= 0, "window size must be >= 0 tokens (0 = no windows), got ", o.window_tokens);
    GRACE_CHECK_ARG(o.chunk_tokens >= 1, "chunk size must be at least 1 token, got ", o.chunk_tokens);
    if (o.topology) o.topology->validate();
    return o;
}

int64_t num_windows_of(int64_t tokens, int64_t window_tokens) {
    return window_tokens > 0 ? tokens / window_tokens + (tokens % window_tokens != 0) : 0;
}

void check_layer_shape(const std::vector<int64_t>& shape, int rank_max, const std::string& what) {
    GRACE_CHECK_INPUT(!shape.empty() && static_cast<int>(shape.size()) <= rank_max, what, " must have rank ",
                      rank_max - 1, " or ", rank_max, ", got rank ", shape.size());
}

// Peak memory of profiling, estimated before anything is allocated: the result's affinity [L, E, E] int64, and
// the counting tables PairCounter gives each token group (uint16 + int64 per cell, or per-expert loads when k = 1;
// per-source loads [L, G, E] when a topology is given), split the way PairCounter splits its workers.
void check_profile_memory(int L, int E, int k, int G, int num_threads, const std::string& experts_from,
                          int64_t num_windows = 0) {
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    const int token_groups = std::max(1, threads / std::max(1, std::min(threads, L)));
    const double cells = static_cast<double>(L) * E * E;
    const double counters = k >= 2 ? cells * (sizeof(uint16_t) + sizeof(int64_t)) : static_cast<double>(L) * E * 8;
    const double bytes = cells * sizeof(int64_t) + token_groups * counters +
                         (token_groups + 1.0) * static_cast<double>(L) * G * E * sizeof(int64_t) +
                         static_cast<double>(L) * num_windows * E * sizeof(int64_t);
    detail::check_memory(bytes, cat("profile: the affinity of ", E, " experts (", experts_from, ") over ", L,
                                    " layers, with its counting tables,"));
}

// Sizes the per-window arrays of `st` (num_tokens set) for windows of `window_tokens` tokens; no-op for 0.
void init_windows(RoutingStats& st, int64_t window_tokens) {
    st.window_tokens = window_tokens;
    if (window_tokens <= 0) return;
    const int64_t T = st.num_tokens, n = num_windows_of(T, window_tokens);  // no T + W - 1: W may be near INT64_MAX
    GRACE_CHECK_ARG(n <= detail::kInt32Max, "window size ", window_tokens, " gives ", n,
                    " windows, more than int holds; choose a larger window");
    st.window_counts.assign(n, window_tokens);
    st.window_counts.back() = T - (n - 1) * window_tokens;
    st.window_weight.assign(n, 1.0);
    st.window_load.assign(static_cast<size_t>(st.num_layers) * n * st.num_experts, 0);
}

// Adds tokens [first, first + n) of ids [n, L, k] (already checked by the counter) to the per-window loads.
void count_windows(const int32_t* ids, int64_t n, int64_t first, RoutingStats& st) {
    if (st.window_tokens <= 0) return;
    const int L = st.num_layers, k = st.top_k, E = st.num_experts;
    const int64_t W = st.num_windows();
    for (int64_t t = 0; t < n; ++t) {
        const int64_t w = (first + t) / st.window_tokens;
        for (int l = 0; l < L; ++l) {
            const int32_t* row = ids + (t * L + l) * k;
            int64_t* out = st.window_load.data() + (l * W + w) * E;
            for (int j = 0; j < k; ++j) ++out[row[j]];
        }
    }
}

int64_t as_count(double v, const std::string& what) {
    GRACE_CHECK_INPUT(std::isfinite(v) && v >= 0 && v == std::floor(v) && v < 9.0e15, what, " = ", v,
                      " is not a non-negative whole count");
    return static_cast<int64_t>(v);
}

}  // namespace

void RoutingStats::validate() const {
    GRACE_CHECK_INPUT(num_layers >= 1 && num_experts >= 1, "statistics need L >= 1 and E >= 1, got L = ", num_layers,
                      ", E = ", num_experts);
    GRACE_CHECK_INPUT(top_k >= 0 && top_k <= num_experts, "top_k = ", top_k, " must lie in [0, E = ", num_experts, "]");
    GRACE_CHECK_INPUT(num_tokens >= 0, "num_tokens = ", num_tokens, " is negative");
    const size_t L = num_layers, E = num_experts;
    detail::checked_product({num_layers, num_experts, num_experts}, "statistics L x E x E");
    GRACE_CHECK_INPUT(affinity.size() == L * E * E, "affinity has ", affinity.size(),
                      " entries, expected L*E*E = ", L * E * E);
    GRACE_CHECK_INPUT(load.size() == L * E, "load has ", load.size(), " entries, expected L*E = ", L * E);
    GRACE_CHECK_INPUT(num_gpus >= 0, "num_gpus = ", num_gpus, " is negative");
    detail::checked_product({num_layers, num_gpus, num_experts}, "statistics L x G x E");
    GRACE_CHECK_INPUT(source_load.size() == L * num_gpus * E, "source_load has ", source_load.size(),
                      " entries, expected L*G*E = ", L * num_gpus * E);
    for (size_t l = 0; l < L; ++l)
        for (size_t i = 0; i < E; ++i) {
            GRACE_CHECK_INPUT(load[l * E + i] >= 0, "load of expert ", i, " at layer ", l, " is negative");
            GRACE_CHECK_INPUT(affinity[(l * E + i) * E + i] == 0, "affinity diagonal A[", l, "][", i, "][", i,
                              "] = ", affinity[(l * E + i) * E + i], " is not 0");
            for (size_t j = i + 1; j < E; ++j) {
                int64_t a = affinity[(l * E + i) * E + j], b = affinity[(l * E + j) * E + i];
                GRACE_CHECK_INPUT(a == b, "affinity is not symmetric at layer ", l, ": A[", i, "][", j, "] = ", a,
                                  " but A[", j, "][", i, "] = ", b);
                GRACE_CHECK_INPUT(a >= 0, "affinity A[", l, "][", i, "][", j, "] = ", a, " is negative");
            }
        }
    for (int64_t v : source_load) GRACE_CHECK_INPUT(v >= 0, "source_load has a negative entry ", v);
    for (const StatsSource& s : sources)
        GRACE_CHECK_INPUT(
            s.num_tokens >= 0 && std::isfinite(s.weight) && s.weight > 0 && std::isfinite(s.scale) && s.scale >= 0,
            "source ", s.trace, ": num_tokens = ", s.num_tokens, ", weight = ", s.weight, ", scale = ", s.scale,
            " (need tokens >= 0, a finite weight > 0 and scale >= 0)");
    GRACE_CHECK_INPUT(window_tokens >= 0, "window_tokens = ", window_tokens, " is negative");
    const size_t W = window_counts.size();
    if (window_tokens == 0) {
        GRACE_CHECK_INPUT(W == 0 && window_load.empty() && window_weight.empty(),
                          "per-window loads are present but window_tokens is 0");
        return;
    }
    GRACE_CHECK_INPUT(W >= 1, "window_tokens = ", window_tokens, " but there are no windows");
    detail::checked_product({num_layers, static_cast<int64_t>(W), num_experts}, "statistics L x windows x E");
    GRACE_CHECK_INPUT(window_load.size() == L * W * E, "window_load has ", window_load.size(),
                      " entries, expected L*windows*E = ", L * W * E);
    GRACE_CHECK_INPUT(window_weight.size() == W, "window_weight has ", window_weight.size(), " entries, expected ", W,
                      " (one per window)");
    for (size_t w = 0; w < W; ++w) {
        GRACE_CHECK_INPUT(window_counts[w] >= 1 && window_counts[w] <= window_tokens, "window ", w, " holds ",
                          window_counts[w], " tokens, outside [1, window_tokens = ", window_tokens, "]");
        GRACE_CHECK_INPUT(std::isfinite(window_weight[w]) && window_weight[w] > 0, "window ", w, " has weight ",
                          window_weight[w], ", not a finite number > 0");
    }
    for (size_t l = 0; l < L; ++l)
        for (size_t w = 0; w < W; ++w)
            for (size_t e = 0; e < E; ++e) {
                const int64_t v = window_load[(l * W + w) * E + e];
                GRACE_CHECK_INPUT(v >= 0 && v <= window_counts[w], "window_load[", l, "][", w, "][", e, "] = ", v,
                                  " is outside [0, tokens of the window = ", window_counts[w], "]");
            }
}

RoutingStats profile_trace(const RoutingTrace& trace, const ProfileOptions& options) {
    ProfileOptions o = checked(options);
    GRACE_CHECK_INPUT(trace.num_tokens >= 1, "cannot profile an empty trace (0 tokens)");
    GRACE_CHECK_INPUT(trace.num_layers >= 1, "trace has ", trace.num_layers, " layers");
    GRACE_CHECK_INPUT(trace.top_k >= 1 && trace.top_k <= trace.num_experts, "top_k = ", trace.top_k,
                      " must lie in [1, E = ", trace.num_experts, "]");
    GRACE_CHECK_INPUT(trace.expert_ids.size() == static_cast<size_t>(trace.num_tokens) * trace.num_layers * trace.top_k,
                      "trace holds ", trace.expert_ids.size(),
                      " ids, expected T*L*k = ", trace.num_tokens * trace.num_layers * trace.top_k);
    for (float w : trace.gate_weights)
        GRACE_CHECK_INPUT(std::isfinite(w), "gate weights contain a non-finite value (", w, ")");
    RoutingStats st;
    st.num_layers = trace.num_layers;
    st.num_experts = trace.num_experts;
    st.top_k = trace.top_k;
    st.num_tokens = trace.num_tokens;
    st.model = trace.model;
    st.dataset = trace.dataset;
    st.num_gpus = o.topology ? o.topology->num_gpus() : 0;
    check_profile_memory(st.num_layers, st.num_experts, st.top_k, st.num_gpus, o.num_threads, "the trace's E",
                         num_windows_of(st.num_tokens, o.window_tokens));
    detail::PairCounter counter(st.num_layers, st.num_experts, st.top_k, st.num_tokens, st.num_gpus, o.num_threads);
    counter.add(trace.expert_ids.data(), trace.num_tokens, 0);
    init_windows(st, o.window_tokens);
    count_windows(trace.expert_ids.data(), trace.num_tokens, 0, st);
    finish_stats(counter, st);
    return st;
}

RoutingStats profile_trace_file(const std::string& path, const TraceOverrides& overrides,
                                const ProfileOptions& options) {
    ProfileOptions o = checked(options);
    TraceReader reader(path, overrides);
    GRACE_CHECK_INPUT(reader.num_tokens() >= 1, path, ": cannot profile an empty trace (0 tokens)");
    RoutingStats st;
    st.num_layers = reader.num_layers();
    st.num_experts = reader.num_experts();
    st.top_k = reader.top_k();
    st.num_tokens = reader.num_tokens();
    st.model = reader.model();
    st.dataset = reader.dataset();
    st.num_gpus = o.topology ? o.topology->num_gpus() : 0;
    check_profile_memory(st.num_layers, st.num_experts, st.top_k, st.num_gpus, o.num_threads,
                         overrides.num_experts ? "--experts" : "num_experts in " + trace_metadata_path(path),
                         num_windows_of(st.num_tokens, o.window_tokens));
    init_windows(st, o.window_tokens);
    detail::PairCounter counter(st.num_layers, st.num_experts, st.top_k, st.num_tokens, st.num_gpus, o.num_threads);
    // The counting kernel checks every id as it counts (in parallel, with TraceReader's messages), so the reader
    // skips its own pass; chunk c+1 is read on another thread while chunk c is counted.
    reader.set_validation(false);
    const int64_t chunk = std::max<int64_t>(1, std::min(o.chunk_tokens, st.num_tokens));
    RoutingTrace cur, next;
    int64_t first = 0, next_first = 0;
    bool have = reader.next(chunk, cur, &first);
    while (have) {
        std::future<bool> pending =
            std::async(std::launch::async, [&] { return reader.next(chunk, next, &next_first); });
        try {
            counter.add(cur.expert_ids.data(), cur.num_tokens, first);
            count_windows(cur.expert_ids.data(), cur.num_tokens, first, st);
        } catch (const Error& e) {
            pending.wait();
            throw Error(e.code(), path + ": " + e.what());
        }
        have = pending.get();
        std::swap(cur, next);
        first = next_first;
    }
    GRACE_CHECK_INPUT(counter.tokens_seen() == st.num_tokens, path, ": read ", counter.tokens_seen(),
                      " tokens, the header says ", st.num_tokens);
    finish_stats(counter, st);
    return st;
}

void save_stats(const RoutingStats& stats, const std::string& dir) {
    stats.validate();
    json meta = {{"format", "grace.stats/v1"}, {"num_layers", stats.num_layers}, {"num_experts", stats.num_experts},
                 {"top_k", stats.top_k},       {"num_tokens", stats.num_tokens}, {"model", stats.model},
                 {"dataset", stats.dataset},   {"num_gpus", stats.num_gpus}};
    if (!stats.sources.empty()) {
        json sources = json::array();
        for (const StatsSource& s : stats.sources)
            sources.push_back({{"trace", s.trace},
                               {"dataset", s.dataset},
                               {"num_tokens", s.num_tokens},
                               {"weight", s.weight},
                               {"scale", s.scale}});
        meta["sources"] = sources;
    }
    if (stats.window_tokens > 0) meta["window_tokens"] = stats.window_tokens;
    const int64_t L = stats.num_layers, E = stats.num_experts, G = stats.num_gpus, W = stats.num_windows();
    write_dir_atomic(dir, "stats", [&](const std::string& tmp) {
        write_npy((fs::path(tmp) / "affinity.npy").string(), stats.affinity, {L, E, E});
        write_npy((fs::path(tmp) / "load.npy").string(), stats.load, {L, E});
        if (G > 0) write_npy((fs::path(tmp) / "source_load.npy").string(), stats.source_load, {L, G, E});
        if (stats.window_tokens > 0) {
            write_npy((fs::path(tmp) / "window_load.npy").string(), stats.window_load, {L, W, E});
            write_npy((fs::path(tmp) / "window_tokens.npy").string(), stats.window_counts, {W});
            write_npy((fs::path(tmp) / "window_weight.npy").string(), stats.window_weight, {W});
        }
        write_text_atomic((fs::path(tmp) / "meta.json").string(), meta.dump(2) + "\n");
    });
}

RoutingStats load_stats(const std::string& dir) {
    const std::string meta_path = (fs::path(dir) / "meta.json").string();
    json meta;
    try {
        meta = json::parse(read_text(meta_path));
    } catch (const json::exception& e) {
        GRACE_CHECK_INPUT(false, meta_path, ": not valid JSON (", e.what(), ")");
    }
    RoutingStats st;
    GRACE_CHECK_INPUT(meta.is_object() && meta.contains("format") && meta.at("format") == "grace.stats/v1", meta_path,
                      ": not a grace.stats/v1 file");
    // Integers through detail::json_int: 64-bit, range-checked, errors name the field (nothing wraps).
    st.num_layers = detail::json_int_member(meta, meta_path, "", "num_layers", 1, detail::kInt32Max);
    st.num_experts = detail::json_int_member(meta, meta_path, "", "num_experts", 1, detail::kInt32Max);
    if (meta.contains("top_k")) st.top_k = detail::json_int(meta.at("top_k"), meta_path, "top_k", 0, st.num_experts);
    if (meta.contains("num_tokens"))
        st.num_tokens = detail::json_int<int64_t>(meta.at("num_tokens"), meta_path, "num_tokens", 0,
                                                  std::numeric_limits<int64_t>::max());
    if (meta.contains("num_gpus"))
        st.num_gpus = detail::json_int(meta.at("num_gpus"), meta_path, "num_gpus", 0, kMaxGpus);
    if (meta.contains("window_tokens"))
        st.window_tokens = detail::json_int<int64_t>(meta.at("window_tokens"), meta_path, "window_tokens", 1,
                                                     std::numeric_limits<int64_t>::max());
    try {
        st.model = meta.value("model", "");
        st.dataset = meta.value("dataset", "");
        if (meta.contains("sources")) {
            const json& srcs = meta.at("sources");
            GRACE_CHECK_INPUT(srcs.is_array(), meta_path, ": sources is not an array");
            for (size_t i = 0; i < srcs.size(); ++i) {
                const json& j = srcs[i];
                const std::string field = cat("sources[", i, "]");
                GRACE_CHECK_INPUT(j.is_object(), meta_path, ": ", field, " is not an object");
                StatsSource s;
                s.trace = j.value("trace", "");
                s.dataset = j.value("dataset", "");
                s.num_tokens = detail::json_int_member<int64_t>(j, meta_path, field, "num_tokens", 0,
                                                                std::numeric_limits<int64_t>::max());
                s.weight = j.at("weight").get<double>();
                s.scale = j.value("scale", 1.0);
                st.sources.push_back(std::move(s));
            }
        }
    } catch (const json::exception& e) {
        GRACE_CHECK_INPUT(false, meta_path, ": missing or mistyped field (", e.what(), ")");
    }
    // The arrays' sizes follow from these numbers; they must be representable before any shape is compared.
    detail::checked_product({st.num_layers, st.num_experts, st.num_experts}, meta_path + ": L x E x E");
    detail::checked_product({st.num_layers, st.num_gpus, st.num_experts}, meta_path + ": L x G x E");
    const int64_t L = st.num_layers, E = st.num_experts, G = st.num_gpus;
    auto read = [&](const std::string& name, const std::vector<int64_t>& expect) {
        std::string p = (fs::path(dir) / name).string();
        // The header first: a file whose shape disagrees is not read (its size is not what meta.json implies).
        GRACE_CHECK_INPUT(read_npy_header(p).shape == expect, p, ": shape does not match meta.json (L = ", L,
                          ", E = ", E, ", G = ", G, ")");
        return read_npy_int(p);
    };
    st.affinity = read("affinity.npy", {L, E, E});
    st.load = read("load.npy", {L, E});
    if (G > 0) st.source_load = read("source_load.npy", {L, G, E});
    if (st.window_tokens > 0) {
        const std::string counts_path = (fs::path(dir) / "window_tokens.npy").string();
        const std::vector<int64_t> wshape = read_npy_header(counts_path).shape;
        GRACE_CHECK_INPUT(wshape.size() == 1 && wshape[0] >= 1, counts_path, ": expected [windows], got rank ",
                          wshape.size());
        const int64_t W = wshape[0];
        detail::checked_product({L, W, E}, meta_path + ": L x windows x E");
        st.window_counts = read_npy_int(counts_path);
        st.window_load = read("window_load.npy", {L, W, E});
        const std::string weight_path = (fs::path(dir) / "window_weight.npy").string();
        GRACE_CHECK_INPUT(read_npy_header(weight_path).shape == std::vector<int64_t>{W}, weight_path,
                          ": shape does not match window_tokens.npy (", W, " windows)");
        st.window_weight = read_npy_float(weight_path);
    }
    try {
        st.validate();
    } catch (const Error& e) {
        throw Error(e.code(), dir + ": " + e.what());
    }
    return st;
}

RoutingStats stats_from_aggregates(const std::vector<double>& coactivation, const std::vector<int64_t>& coact_shape,
                                   const std::vector<double>& load, const std::vector<int64_t>& load_shape,
                                   bool ordered_pairs, int top_k) {
    GRACE_CHECK_INPUT(coact_shape.size() == 2 || coact_shape.size() == 3,
                      "co-activation must be [L, E, E] or [E, E], got rank ", coact_shape.size());
    const int64_t E = coact_shape.back();
    GRACE_CHECK_INPUT(E >= 1 && coact_shape[coact_shape.size() - 2] == E,
                      "co-activation must be [L, E, E] or [E, E], got a non-square [",
                      coact_shape[coact_shape.size() - 2], ", ", E, "] block");
    const int64_t L = coact_shape.size() == 3 ? coact_shape[0] : 1;
    GRACE_CHECK_INPUT(L >= 1, "co-activation has no layers");
    detail::checked_product({L, E, E}, "co-activation L x E x E");
    GRACE_CHECK_INPUT(static_cast<int64_t>(coactivation.size()) == L * E * E, "co-activation holds ",
                      coactivation.size(), " values, its shape says ", L * E * E);
    GRACE_CHECK_ARG(top_k >= 0 && top_k <= E, "top_k = ", top_k, " must lie in [0, E = ", E, "]");
    RoutingStats st;
    st.num_layers = static_cast<int>(L);
    st.num_experts = static_cast<int>(E);
    st.top_k = top_k;
    st.affinity.assign(L * E * E, 0);
    for (int64_t l = 0; l < L; ++l)
        for (int64_t i = 0; i < E; ++i)
            for (int64_t j = 0; j < E; ++j) {
                if (i == j) continue;  // the diagonal carries no pair (C2R's files mark it with -1 or 0)
                double v = coactivation[(l * E + i) * E + j];
                double w = coactivation[(l * E + j) * E + i];
                GRACE_CHECK_INPUT(v == w, "co-activation is not symmetric at layer ", l, ": [", i, "][", j, "] = ", v,
                                  " but [", j, "][", i, "] = ", w);
                int64_t c = as_count(v, cat("co-activation [", l, "][", i, "][", j, "]"));
                if (ordered_pairs) {
                    GRACE_CHECK_INPUT(c % 2 == 0, "co-activation [", l, "][", i, "][", j, "] = ", c,
                                      " is odd, so it cannot count ordered pairs (2*A); import without "
                                      "--ordered-pairs if entries already count tokens");
                    c /= 2;
                }
                st.affinity[(l * E + i) * E + j] = c;
            }
    if (!load.empty()) {
        check_layer_shape(load_shape, 2, "load");
        const int64_t lL = load_shape.size() == 2 ? load_shape[0] : 1;
        GRACE_CHECK_INPUT(lL == L && load_shape.back() == E, "load shape does not match co-activation [L = ", L,
                          ", E = ", E, "]");
        GRACE_CHECK_INPUT(static_cast<int64_t>(load.size()) == L * E, "load holds ", load.size(), " values, expected ",
                          L * E);
        st.load.resize(L * E);
        for (int64_t i = 0; i < L * E; ++i) st.load[i] = as_count(load[i], cat("load [", i / E, "][", i % E, "]"));
    } else {
        GRACE_CHECK_INPUT(top_k >= 2, "loads cannot be derived from co-activation without top_k >= 2; give --load");
        st.load.resize(L * E);
        for (int64_t l = 0; l < L; ++l)
            for (int64_t i = 0; i < E; ++i) {
                int64_t row = 0;
                for (int64_t j = 0; j < E; ++j) row += st.affinity[(l * E + i) * E + j];
                GRACE_CHECK_INPUT(row % (top_k - 1) == 0, "row sum ", row, " of expert ", i, " at layer ", l,
                                  " is not a multiple of k-1 = ", top_k - 1, ": co-activation is not from top-", top_k,
                                  " routing");
                st.load[l * E + i] = row / (top_k - 1);
            }
    }
    if (top_k >= 1) {
        int64_t total = 0;
        for (int64_t i = 0; i < E; ++i) total += st.load[i];
        if (total % top_k == 0) st.num_tokens = total / top_k;
    }
    st.validate();
    return st;
}

RoutingStats import_aggregates(const std::string& coactivation_path, const std::string& load_path, bool ordered_pairs,
                               int top_k) {
    std::vector<int64_t> cshape, lshape;
    std::vector<double> coact = read_npy_float(coactivation_path, &cshape), load;
    if (!load_path.empty()) load = read_npy_float(load_path, &lshape);
    try {
        return stats_from_aggregates(coact, cshape, load, lshape, ordered_pairs, top_k);
    } catch (const Error& e) {
        throw Error(e.code(), coactivation_path + ": " + e.what());
    }
}

RoutingStats merge_stats(const std::vector<RoutingStats>& parts, const std::vector<std::string>& paths,
                         const std::vector<double>& weights) {
    GRACE_CHECK_ARG(!parts.empty(), "a mix needs at least one trace");
    GRACE_CHECK_ARG(paths.size() == parts.size(), "merge_stats: ", paths.size(), " names for ", parts.size(),
                    " statistics");
    GRACE_CHECK_ARG(weights.empty() || weights.size() == parts.size(), "--mix gives ", weights.size(), " weights for ",
                    parts.size(), " traces");
    for (size_t d = 0; d < weights.size(); ++d)
        GRACE_CHECK_ARG(std::isfinite(weights[d]) && weights[d] > 0, "--mix weight ", d + 1, " (for ", paths[d],
                        ") is ", weights[d], "; weights must be finite numbers > 0");
    const RoutingStats& first = parts[0];
    int64_t T = 0;
    for (size_t d = 0; d < parts.size(); ++d) {
        const RoutingStats& p = parts[d];
        p.validate();
        auto differs = [&](const char* what, int64_t mine, int64_t theirs) {
            GRACE_CHECK_INPUT(mine == theirs, paths[d], " has ", what, "=", mine, " but ", paths[0], " has ", what, "=",
                              theirs, "; a mix needs the same E, L and k in every trace");
        };
        differs("E", p.num_experts, first.num_experts);
        differs("L", p.num_layers, first.num_layers);
        differs("k", p.top_k, first.top_k);
        differs("G", p.num_gpus, first.num_gpus);
        differs("window_tokens", p.window_tokens, first.window_tokens);
        GRACE_CHECK_INPUT(p.num_tokens >= 1, paths[d], ": statistics without a token count cannot be mixed");
        GRACE_CHECK_INPUT(T <= std::numeric_limits<int64_t>::max() - p.num_tokens, "the mix has too many tokens");
        T += p.num_tokens;
    }
    // scale[d]: factor on trace d's counts. Token weighting is the plain sum (scale 1, exact integers).
    const size_t D = parts.size();
    std::vector<double> scale(D, 1.0);
    // Weights relative to the largest: their sum stays finite for weights near DBL_MAX (1e308,1e308 summed to inf
    // and gave every trace the share 0).
    const double wmax = weights.empty() ? 1.0 : *std::max_element(weights.begin(), weights.end());
    double wsum = 0;
    for (double w : weights) wsum += w / wmax;
    for (size_t d = 0; d < weights.size(); ++d)
        scale[d] = weights[d] / wmax / wsum * static_cast<double>(T) / static_cast<double>(parts[d].num_tokens);
    auto combine = [&](auto member) {
        std::vector<int64_t> out((first.*member).size(), 0);
        if (weights.empty()) {
            for (const RoutingStats& p : parts)
                for (size_t i = 0; i < out.size(); ++i) out[i] += (p.*member)[i];
            return out;
        }
        for (size_t i = 0; i < out.size(); ++i) {
            double v = 0;  // summed in trace order: the same bytes for any thread count
            for (size_t d = 0; d < D; ++d) v += scale[d] * static_cast<double>((parts[d].*member)[i]);
            out[i] = std::llround(v);
        }
        return out;
    };
    RoutingStats st;
    st.num_layers = first.num_layers;
    st.num_experts = first.num_experts;
    st.top_k = first.top_k;
    st.num_tokens = T;
    st.num_gpus = first.num_gpus;
    auto joined = [&](std::string RoutingStats::*member) {
        std::string out;
        for (const RoutingStats& p : parts) {
            const std::string& v = p.*member;
            bool seen = false;
            for (const RoutingStats& q : parts) {
                if (&q == &p) break;
                seen = seen || q.*member == v;
            }
            if (!seen) out += (out.empty() ? "" : "+") + v;
        }
        return out;
    };
    st.model = joined(&RoutingStats::model);
    st.dataset = joined(&RoutingStats::dataset);
    st.affinity = combine(&RoutingStats::affinity);
    st.load = combine(&RoutingStats::load);
    st.source_load = combine(&RoutingStats::source_load);
    for (size_t d = 0; d < D; ++d) {
        const RoutingStats& p = parts[d];
        st.sources.push_back({paths[d], p.dataset, p.num_tokens,
                              weights.empty() ? static_cast<double>(p.num_tokens) : weights[d], scale[d]});
    }
    st.window_tokens = first.window_tokens;
    if (st.window_tokens > 0) {
        const int64_t L = st.num_layers, E = st.num_experts;
        int64_t W = 0;
        for (const RoutingStats& p : parts) W += p.num_windows();
        detail::checked_product({L, W, E}, "mixed statistics L x windows x E");
        st.window_load.resize(static_cast<size_t>(L * W * E));
        int64_t w0 = 0;
        for (size_t d = 0; d < D; ++d) {
            const RoutingStats& p = parts[d];
            const int64_t Wd = p.num_windows();
            for (int64_t l = 0; l < L; ++l)
                std::copy_n(p.window_load.begin() + l * Wd * E, Wd * E, st.window_load.begin() + (l * W + w0) * E);
            st.window_counts.insert(st.window_counts.end(), p.window_counts.begin(), p.window_counts.end());
            for (double x : p.window_weight) st.window_weight.push_back(x * scale[d]);
            w0 += Wd;
        }
    }
    st.validate();
    return st;
}

std::vector<double> robust_loads(const RoutingStats& stats, double q) {
    GRACE_CHECK_ARG(std::isfinite(q) && q > 0 && q <= 1, "robust quantile q = ", q, " is outside (0, 1]");
    GRACE_CHECK_ARG(stats.window_tokens > 0 && stats.num_windows() > 0,
                    "robust planning needs per-window loads, which these statistics lack; re-profile with "
                    "`grace profile ... --window-tokens W`");
    const int L = stats.num_layers, E = stats.num_experts, W = stats.num_windows();
    std::vector<double> out(static_cast<size_t>(L) * E);
    std::vector<double> weight(W);
    double total_weight = 0;
    for (int w = 0; w < W; ++w)
        total_weight += weight[w] = static_cast<double>(stats.window_counts[w]) * stats.window_weight[w];
    std::vector<std::pair<double, double>> rates(W);  // (rate, weight) of each window
    std::vector<double> quantile(E);
    for (int l = 0; l < L; ++l) {
        for (int e = 0; e < E; ++e) {
            for (int w = 0; w < W; ++w) {
                const int64_t c = stats.window_load[(static_cast<size_t>(l) * W + w) * E + e];
                rates[w] = {static_cast<double>(c) / static_cast<double>(stats.window_counts[w]), weight[w]};
            }
            std::sort(rates.begin(), rates.end());
            // Lower q-quantile: the first rate whose cumulative weight reaches q of the total (a relative
            // tolerance keeps q = 0.5 of two equal windows on the first one despite rounding).
            const double target = q * total_weight * (1 - 1e-12);
            double cum = 0;
            quantile[e] = rates.back().first;
            for (const auto& [rate, wt] : rates) {
                cum += wt;
                if (cum >= target) {
                    quantile[e] = rate;
                    break;
                }
            }
        }
        double qsum = 0, lsum = 0;
        for (int e = 0; e < E; ++e) qsum += quantile[e], lsum += static_cast<double>(stats.load_at(l, e));
        for (int e = 0; e < E; ++e)
            out[static_cast<size_t>(l) * E + e] =
                qsum > 0 ? quantile[e] * lsum / qsum : static_cast<double>(stats.load_at(l, e));
    }
    return out;
}

}  // namespace grace
