#include "grace/eval.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "grace/error.hpp"
#include "grace/io.hpp"

using json = nlohmann::ordered_json;

namespace grace {

namespace {

struct SchemeName {
    CommScheme scheme;
    const char* name;
};
constexpr SchemeName kSchemeNames[] = {{CommScheme::kFlat, "flat"},
                                       {CommScheme::kFlatDedup, "flat-dedup"},
                                       {CommScheme::k2dh, "2dh"},
                                       {CommScheme::kHsc, "hsc"}};

// Bandwidth and latency bounds of one phase over a matrix restricted to cross-node or intra-node pairs.
struct PhaseCost {
    double cross_bw = 0;                      // max over nodes of max(out, in) cross bytes / B_net
    double intra_bw = 0;                      // max over GPUs of max(out, in) intra bytes / B_nvl
    std::vector<int> cross_msgs, intra_msgs;  // [G]: max(out, in) non-empty pairs
    std::vector<int> cross_nodes;             // [G]: max(out, in) distinct remote nodes reached
};

PhaseCost phase_cost(const TrafficMatrix& m, const Topology& topo, double bytes_per_copy, const HardwareModel& hw) {
    const int G = topo.num_gpus(), N = topo.nodes;
    PhaseCost c;
    std::vector<double> node_out(N, 0), node_in(N, 0), gpu_out(G, 0), gpu_in(G, 0);
    std::vector<int> cross_out(G, 0), cross_in(G, 0), intra_out(G, 0), intra_in(G, 0);
    std::vector<std::vector<char>> reach_out(G, std::vector<char>(N, 0)), reach_in(G, std::vector<char>(N, 0));
    for (int s = 0; s < G; ++s)
        for (int d = 0; d < G; ++d) {
            const int64_t v = m.at(s, d);
            if (s == d || v == 0) continue;
            const double b = static_cast<double>(v) * bytes_per_copy;
            if (topo.node_of(s) != topo.node_of(d)) {
                node_out[topo.node_of(s)] += b;
                node_in[topo.node_of(d)] += b;
                ++cross_out[s];
                ++cross_in[d];
                reach_out[s][topo.node_of(d)] = 1;
                reach_in[d][topo.node_of(s)] = 1;
            } else {
                gpu_out[s] += b;
                gpu_in[d] += b;
                ++intra_out[s];
                ++intra_in[d];
            }
        }
    for (int b = 0; b < N; ++b)
        c.cross_bw = std::max(c.cross_bw, std::max(node_out[b], node_in[b]) / hw.cross_node_bandwidth);
    c.cross_msgs.resize(G);
    c.intra_msgs.resize(G);
    c.cross_nodes.resize(G);
    for (int g = 0; g < G; ++g) {
        c.intra_bw = std::max(c.intra_bw, std::max(gpu_out[g], gpu_in[g]) / hw.intra_node_bandwidth);
        c.cross_msgs[g] = std::max(cross_out[g], cross_in[g]);
        c.intra_msgs[g] = std::max(intra_out[g], intra_in[g]);
        int ro = 0, ri = 0;
        for (int b = 0; b < N; ++b) ro += reach_out[g][b], ri += reach_in[g][b];
        c.cross_nodes[g] = std::max(ro, ri);
    }
    return c;
}

double all_to_all_seconds(const TrafficMatrix& m, CommScheme scheme, const Topology& topo, double bytes_per_copy,
                          const HardwareModel& hw) {
    const PhaseCost c = phase_cost(m, topo, bytes_per_copy, hw);
    const int G = topo.num_gpus();
    double latency = 0;
    switch (scheme) {
        case CommScheme::kFlat:
        case CommScheme::kFlatDedup:
            for (int g = 0; g < G; ++g)
                latency = std::max(latency,
                                   c.cross_msgs[g] * hw.cross_node_latency + c.intra_msgs[g] * hw.intra_node_latency);
            return std::max(c.cross_bw, c.intra_bw) + latency;
        case CommScheme::k2dh:
            for (int g = 0; g < G; ++g)
                latency = std::max(latency, c.cross_nodes[g] * hw.cross_node_latency +
                                                (c.intra_msgs[g] + topo.gpus_per_node - 1) * hw.intra_node_latency);
            return std::max(c.cross_bw, c.intra_bw) + latency;
        case CommScheme::kHsc: {
            double cross_lat = 0, intra_lat = 0;
            for (int g = 0; g < G; ++g) {
                cross_lat = std::max(cross_lat, c.cross_msgs[g] * hw.cross_node_latency);
                intra_lat = std::max(intra_lat, c.intra_msgs[g] * hw.intra_node_latency);
            }
            return (c.cross_bw + cross_lat) + (c.intra_bw + intra_lat);
        }
    }
    return 0;
}

std::string fmt(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
}

json metrics_json(const EvalMetrics& m) {
    json j;
    if (m.layer >= 0) j["layer"] = m.layer;
    j["cross_node_copies"] = m.cross_node_copies;
    j["intra_node_copies"] = m.intra_node_copies;
    j["local_selections"] = m.local_selections;
    j["cross_node_bytes"] = m.cross_node_bytes;
    j["intra_node_bytes"] = m.intra_node_bytes;
    j["cross_node_ratio"] = m.cross_node_ratio;
    j["load_std"] = m.load_std;
    j["balancedness"] = m.balancedness;
    j["imbalance_ratio"] = m.imbalance_ratio;
    j["dispatch_time_s"] = m.dispatch_time_s;
    j["combine_time_s"] = m.combine_time_s;
    j["all_to_all_time_s"] = m.all_to_all_time_s;
    j["compute_time_s"] = m.compute_time_s;
    j["mean_compute_time_s"] = m.mean_compute_time_s;
    j["gpu_idle_time_s"] = m.gpu_idle_time_s;
    j["moe_layer_time_s"] = m.moe_layer_time_s;
    j["non_moe_time_s"] = m.non_moe_time_s;
    j["end_to_end_s"] = m.end_to_end_s;
    j["gpu_load"] = m.gpu_load;
    j["gpu_compute_time_s"] = m.gpu_compute_time_s;
    if (m.layer >= 0) {
        j["instance_load"] = m.instance_load;
        const size_t G = m.gpu_load.size();
        json rows = json::array();
        for (size_t s = 0; s < G && m.copies.size() == G * G; ++s)
            rows.push_back(std::vector<int64_t>(m.copies.begin() + s * G, m.copies.begin() + (s + 1) * G));
        j["copies"] = std::move(rows);
    }
    return j;
}

const char* kCsvColumns[] = {"layer",
                             "cross_node_copies",
                             "intra_node_copies",
                             "local_selections",
                             "cross_node_bytes",
                             "intra_node_bytes",
                             "cross_node_ratio",
                             "load_std",
                             "balancedness",
                             "imbalance_ratio",
                             "dispatch_time_s",
                             "combine_time_s",
                             "all_to_all_time_s",
                             "compute_time_s",
                             "mean_compute_time_s",
                             "gpu_idle_time_s",
                             "moe_layer_time_s",
                             "non_moe_time_s",
                             "end_to_end_s"};

// Per-phase columns after kCsvColumns, for each of prefill and decode (0 for a phase without batches).
const char* kCsvPhaseColumns[] = {"all_to_all_time_s", "compute_time_s", "end_to_end_s", "imbalance_ratio"};

// `phases`: the row's metrics in the prefill and the decode phase (nullptr: no batches of that phase).
std::string csv_row(const EvalMetrics& m, const EvalMetrics* const (&phases)[2]) {
    std::string s = m.layer >= 0 ? std::to_string(m.layer) : "total";
    for (double v : {static_cast<double>(m.cross_node_copies), static_cast<double>(m.intra_node_copies),
                     static_cast<double>(m.local_selections), static_cast<double>(m.cross_node_bytes),
                     static_cast<double>(m.intra_node_bytes), m.cross_node_ratio, m.load_std, m.balancedness,
                     m.imbalance_ratio, m.dispatch_time_s, m.combine_time_s, m.all_to_all_time_s, m.compute_time_s,
                     m.mean_compute_time_s, m.gpu_idle_time_s, m.moe_layer_time_s, m.non_moe_time_s, m.end_to_end_s})
        s.append(",").append(fmt(v));  // not "," + fmt(v): GCC 12 warns falsely (-Wrestrict) on it
    for (const EvalMetrics* ph : phases) {
        const EvalMetrics zero;
        const EvalMetrics& p = ph ? *ph : zero;
        for (double v : {p.all_to_all_time_s, p.compute_time_s, p.end_to_end_s, p.imbalance_ratio})
            s.append(",").append(fmt(v));
    }
    return s + "\n";
}

// The phase of `r` named `phase`; a report without phases (price_counts') is one prefill batch: its own.
const PhaseReport* find_phase(const EvalReport& r, BatchPhase phase) {
    for (const PhaseReport& p : r.phases)
        if (p.phase == phase) return &p;
    return nullptr;
}

json phase_json(const PhaseReport& p) {
    json j;
    j["phase"] = to_string(p.phase);
    j["num_batches"] = p.num_batches;
    j["num_tokens"] = p.num_tokens;
    j["min_batch_tokens"] = p.min_batch_tokens;
    j["max_batch_tokens"] = p.max_batch_tokens;
    j["batch_end_to_end_s"] = {
        {"min", p.batch_end_to_end_min_s}, {"mean", p.batch_end_to_end_mean_s}, {"max", p.batch_end_to_end_max_s}};
    j["total"] = metrics_json(p.total);
    return j;
}

}  // namespace

std::string to_string(CommScheme scheme) {
    for (const auto& s : kSchemeNames)
        if (s.scheme == scheme) return s.name;
    return "?";
}

CommScheme parse_comm_scheme(const std::string& name) {
    for (const auto& s : kSchemeNames)
        if (name == s.name) return s.scheme;
    GRACE_CHECK_ARG(false, "unknown communication scheme '", name, "' (expected flat, flat-dedup, 2dh or hsc)");
    return CommScheme::kFlat;
}

void add_metrics(EvalMetrics& total, const EvalMetrics& m) {
    total.cross_node_copies += m.cross_node_copies;
    total.intra_node_copies += m.intra_node_copies;
    total.local_selections += m.local_selections;
    total.cross_node_bytes += m.cross_node_bytes;
    total.intra_node_bytes += m.intra_node_bytes;
    total.load_std += m.load_std;
    total.balancedness += m.balancedness;
    total.imbalance_ratio += m.imbalance_ratio;
    total.dispatch_time_s += m.dispatch_time_s;
    total.combine_time_s += m.combine_time_s;
    total.all_to_all_time_s += m.all_to_all_time_s;
    total.compute_time_s += m.compute_time_s;
    total.mean_compute_time_s += m.mean_compute_time_s;
    total.gpu_idle_time_s += m.gpu_idle_time_s;
    total.moe_layer_time_s += m.moe_layer_time_s;
    total.non_moe_time_s += m.non_moe_time_s;
    total.end_to_end_s += m.end_to_end_s;
    const size_t g_end = std::min(total.gpu_load.size(), m.gpu_load.size());
    for (size_t g = 0; g < g_end; ++g)
        total.gpu_load[g] += m.gpu_load[g], total.gpu_compute_time_s[g] += m.gpu_compute_time_s[g];
}

EvalReport price_counts(const std::vector<LayerCounts>& counts, const ExpertPlan& plan, CommScheme scheme,
                        const HardwareModel& hw, const ModelShape& shape, int64_t num_tokens) {
    hw.validate();
    GRACE_CHECK_ARG(static_cast<int>(counts.size()) == plan.num_layers, "pricing needs counts for all ",
                    plan.num_layers, " layers, got ", counts.size());
    const Topology& topo = plan.topology;
    const int G = topo.num_gpus();
    const ComputeModel compute(hw, shape.model, shape.hidden, shape.intermediate);
    const double bytes_per_copy = static_cast<double>(shape.hidden) * hw.element_size;
    const int64_t tokens_per_gpu = (num_tokens + G - 1) / G;

    EvalReport r;
    r.method = plan.method;
    r.scheme = scheme;
    r.topology = topo;
    r.hardware = hw.name;
    r.compute_model = compute.source();
    r.shape = shape;
    r.num_tokens = num_tokens;
    r.top_k = plan.top_k;
    if (num_tokens >= 1) r.schedule = make_batch_schedule(num_tokens, {});  // the counts are one batch
    EvalMetrics& tot = r.total;
    tot.gpu_load.assign(G, 0);
    tot.gpu_compute_time_s.assign(G, 0);
    for (const LayerCounts& c : counts) {
        const LayerPlan& lp = plan.layers[c.layer];
        EvalMetrics m;
        m.layer = c.layer;
        const TrafficMatrix& tm = c.traffic(scheme);
        m.cross_node_copies = tm.cross_node_copies;
        m.intra_node_copies = tm.intra_node_copies;
        m.local_selections = c.local_selections;
        m.cross_node_bytes = static_cast<int64_t>(static_cast<double>(m.cross_node_copies) * bytes_per_copy);
        m.intra_node_bytes = static_cast<int64_t>(static_cast<double>(m.intra_node_copies) * bytes_per_copy);
        const int64_t all = m.cross_node_copies + m.intra_node_copies;
        m.cross_node_ratio = all > 0 ? static_cast<double>(m.cross_node_copies) / all : 0;
        m.gpu_load = c.gpu_load;
        m.instance_load = c.instance_load;
        m.copies = tm.copies;
        double sum = 0, mx = 0;
        for (int64_t v : c.gpu_load) sum += v, mx = std::max(mx, static_cast<double>(v));
        const double mean = sum / G;
        double var = 0;
        for (int64_t v : c.gpu_load) var += (v - mean) * (v - mean);
        m.load_std = std::sqrt(var / G);
        m.balancedness = mx > 0 ? mean / mx : 1;
        m.imbalance_ratio = mean > 0 ? (mx - mean) / mean : 0;
        m.dispatch_time_s = all_to_all_seconds(tm, scheme, topo, bytes_per_copy, hw);
        m.combine_time_s = m.dispatch_time_s;
        m.all_to_all_time_s = m.dispatch_time_s + m.combine_time_s;
        m.gpu_compute_time_s.assign(G, 0);
        for (size_t e = 0; e < c.instance_load.size(); ++e)
            for (size_t i = 0; i < c.instance_load[e].size(); ++i)
                m.gpu_compute_time_s[lp.instance_gpus[e][i]] += compute.expert_seconds(c.instance_load[e][i]);
        double csum = 0;
        for (double v : m.gpu_compute_time_s) m.compute_time_s = std::max(m.compute_time_s, v), csum += v;
        m.mean_compute_time_s = csum / G;
        m.gpu_idle_time_s = m.compute_time_s - m.mean_compute_time_s;
        m.moe_layer_time_s = m.dispatch_time_s + m.compute_time_s + m.combine_time_s;
        m.non_moe_time_s = static_cast<double>(tokens_per_gpu) * compute.non_moe_seconds_per_token();
        m.end_to_end_s = m.moe_layer_time_s + m.non_moe_time_s;

        add_metrics(tot, m);
        r.layers.push_back(std::move(m));
    }
    const double L = std::max<size_t>(counts.size(), 1);
    tot.load_std /= L;
    tot.balancedness /= L;
    tot.imbalance_ratio /= L;
    const int64_t all = tot.cross_node_copies + tot.intra_node_copies;
    tot.cross_node_ratio = all > 0 ? static_cast<double>(tot.cross_node_copies) / all : 0;
    return r;
}

EvalReport evaluate(const RoutingTrace& trace, const ExpertPlan& plan, const EvalOptions& options) {
    options.hardware.validate();
    check_plan_matches_trace(plan, trace);
    const ModelShape shape = options.shape ? *options.shape : resolve_model_shape(options.hardware, trace.model);
    check_model_shape(shape, trace.num_experts, trace.num_layers, "the trace");
    BatchedEval batched(plan, make_batch_schedule(trace.num_tokens, options.batching), {options.scheme},
                        options.hardware, shape, options.replay);
    batched.consume(trace, 0);
    EvalReport r = batched.report();
    r.dataset = trace.dataset;
    r.policy = routing_label(plan, options.replay.policy);
    return r;
}

std::string routing_label(const ExpertPlan& plan, const std::optional<RoutingPolicy>& override_policy) {
    if (override_policy) return to_string(*override_policy);
    for (const auto& lp : plan.layers)
        if (lp.policy != plan.layers[0].policy) return "plan";
    return plan.layers.empty() ? "primary" : to_string(plan.layers[0].policy);
}

std::string report_to_json(const EvalReport& r) {
    json j;
    j["format"] = "grace.eval/v1";
    j["method"] = r.method;
    j["policy"] = r.policy;
    j["scheme"] = to_string(r.scheme);
    j["topology"] = r.topology.to_string();
    j["hardware"] = r.hardware;
    j["compute_model"] = r.compute_model;
    j["model"] = r.shape.model;
    j["hidden"] = r.shape.hidden;
    j["intermediate"] = r.shape.intermediate;
    j["dataset"] = r.dataset;
    j["num_tokens"] = r.num_tokens;
    j["top_k"] = r.top_k;
    j["units"] = "copies and bytes per direction (dispatch; combine sends the same); times in seconds";
    const BatchSchedule& b = r.schedule;
    j["trace_tokens"] = b.trace_tokens;
    j["batching"] = {{"workload", b.workload ? json(to_string(*b.workload)) : json(nullptr)},
                     {"batch_tokens", b.batch_tokens > 0 ? json(b.batch_tokens) : json(nullptr)},
                     {"rounds", b.rounds},
                     {"num_batches", b.num_batches()},
                     {"unused_tokens", b.trace_tokens - b.num_tokens()}};
    j["total"] = metrics_json(r.total);
    json phases = json::array();
    for (const PhaseReport& p : r.phases) phases.push_back(phase_json(p));
    j["phases"] = std::move(phases);
    json layers = json::array();
    for (const auto& m : r.layers) layers.push_back(metrics_json(m));
    j["layers"] = std::move(layers);
    return j.dump(1) + "\n";
}

std::string report_to_csv(const EvalReport& r) {
    std::string s;
    for (size_t i = 0; i < std::size(kCsvColumns); ++i) {
        if (i) s += ",";
        s += kCsvColumns[i];
    }
    for (const char* phase : {"prefill_", "decode_"})
        for (const char* c : kCsvPhaseColumns) s.append(",").append(phase).append(c);
    s += "\n";
    // A report without phases (straight from price_counts) is the whole trace as one prefill batch.
    const PhaseReport* ph[2] = {find_phase(r, BatchPhase::kPrefill), find_phase(r, BatchPhase::kDecode)};
    const bool whole = r.phases.empty();
    for (size_t l = 0; l < r.layers.size(); ++l) {
        const EvalMetrics* cols[2] = {whole   ? &r.layers[l]
                                      : ph[0] ? &ph[0]->layers[l]
                                              : nullptr,
                                      ph[1] ? &ph[1]->layers[l] : nullptr};
        s += csv_row(r.layers[l], cols);
    }
    const EvalMetrics* cols[2] = {whole ? &r.total : ph[0] ? &ph[0]->total : nullptr, ph[1] ? &ph[1]->total : nullptr};
    s += csv_row(r.total, cols);
    return s;
}

void save_report(const EvalReport& r, const std::string& stem_in) {
    std::string stem = stem_in;
    if (stem.size() > 5 && stem.substr(stem.size() - 5) == ".json") stem.resize(stem.size() - 5);
    // The .csv and the .json are one output: both are written before either appears, the .json last.
    OutputSet out;
    out.add_text(stem + ".csv", report_to_csv(r));
    out.add_text(stem + ".json", report_to_json(r));
    out.commit();
}

std::string format_report_table(const EvalReport& r) {
    const EvalMetrics& t = r.total;
    char buf[2048];
    std::snprintf(buf, sizeof buf,
                  "method %s | routing %s | comm %s | topology %s | hardware %s (%s) | %lld tokens\n"
                  "  cross-node copies  %14lld   (%.1f MB per direction, ratio %.3f)\n"
                  "  intra-node copies  %14lld   (%.1f MB per direction)\n"
                  "  all-to-all time    %14.3f ms  (dispatch + combine, summed over %zu layers)\n"
                  "  GPU compute (max)  %14.3f ms\n"
                  "  GPU idle time      %14.3f ms\n"
                  "  load std (mean)    %14.1f     balancedness %.3f   imbalance %.3f\n"
                  "  MoE layer time     %14.3f ms\n"
                  "  end-to-end est.    %14.3f ms\n",
                  r.method.c_str(), r.policy.c_str(), to_string(r.scheme).c_str(), r.topology.to_string().c_str(),
                  r.hardware.c_str(), r.compute_model.c_str(), static_cast<long long>(r.num_tokens),
                  static_cast<long long>(t.cross_node_copies), t.cross_node_bytes / 1e6, t.cross_node_ratio,
                  static_cast<long long>(t.intra_node_copies), t.intra_node_bytes / 1e6, t.all_to_all_time_s * 1e3,
                  r.layers.size(), t.compute_time_s * 1e3, t.gpu_idle_time_s * 1e3, t.load_std, t.balancedness,
                  t.imbalance_ratio, t.moe_layer_time_s * 1e3, t.end_to_end_s * 1e3);
    std::string out = buf;
    const BatchSchedule& b = r.schedule;
    if (b.round.empty() || b.whole_trace()) return out;
    std::snprintf(buf, sizeof buf, "  batches: %s%s%lld in %lld round%s; %lld of %lld tokens priced\n",
                  b.workload ? ("workload " + to_string(*b.workload) + ", ").c_str() : "",
                  b.batch_tokens > 0 ? ("at most " + std::to_string(b.batch_tokens) + " tokens each, ").c_str() : "",
                  static_cast<long long>(b.num_batches()), static_cast<long long>(b.rounds), b.rounds == 1 ? "" : "s",
                  static_cast<long long>(b.num_tokens()), static_cast<long long>(b.trace_tokens));
    out += buf;
    for (const PhaseReport& p : r.phases) {
        const std::string sizes = p.min_batch_tokens == p.max_batch_tokens
                                      ? std::to_string(p.max_batch_tokens)
                                      : std::to_string(p.min_batch_tokens) + "-" + std::to_string(p.max_batch_tokens);
        std::snprintf(buf, sizeof buf,
                      "  %-7s %6lld batch%s of %s tokens: end-to-end %.3f ms, all-to-all %.3f ms, compute %.3f ms, "
                      "imbalance %.3f; per batch %.3f / %.3f / %.3f ms (min / mean / max)\n",
                      to_string(p.phase).c_str(), static_cast<long long>(p.num_batches), p.num_batches == 1 ? "" : "es",
                      sizes.c_str(), p.total.end_to_end_s * 1e3, p.total.all_to_all_time_s * 1e3,
                      p.total.compute_time_s * 1e3, p.total.imbalance_ratio, p.batch_end_to_end_min_s * 1e3,
                      p.batch_end_to_end_mean_s * 1e3, p.batch_end_to_end_max_s * 1e3);
        out += buf;
    }
    return out;
}

}  // namespace grace
