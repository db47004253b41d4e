#include "grace/compare.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "grace/pricing.hpp"
#include "grace/engine_eval.hpp"
#include "grace/error.hpp"
#include "grace/planner.hpp"

using json = nlohmann::ordered_json;

namespace grace {

namespace {

double since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The metrics the relative columns report, as (key, getter); lower is better for all of them.
struct RelMetric {
    const char* key;
    double (*get)(const EvalMetrics&);
};
const RelMetric kRelMetrics[] = {
    {"all_to_all_time_s", [](const EvalMetrics& m) { return m.all_to_all_time_s; }},
    {"cross_node_copies", [](const EvalMetrics& m) { return static_cast<double>(m.cross_node_copies); }},
    {"intra_node_copies", [](const EvalMetrics& m) { return static_cast<double>(m.intra_node_copies); }},
    {"gpu_idle_time_s", [](const EvalMetrics& m) { return m.gpu_idle_time_s; }},
    {"load_std", [](const EvalMetrics& m) { return m.load_std; }},
    {"moe_layer_time_s", [](const EvalMetrics& m) { return m.moe_layer_time_s; }},
    {"end_to_end_s", [](const EvalMetrics& m) { return m.end_to_end_s; }},
};

double rel(double v, double ref) { return ref != 0 ? (v - ref) / ref : 0; }

// Prices every entry of `res` under `schedule`: one streamed pass over the trace's first schedule.num_tokens()
// tokens feeds a BatchedEval per plan (the plans in parallel); an entry's report is its plan's under its scheme.
void evaluate_workload(CompareResult& res, const BatchSchedule& schedule, const std::string& trace_path,
                       const TraceOverrides& overrides, const std::vector<std::vector<SlotMap>>& slot_maps,
                       const ModelShape& shape, const CompareOptions& options, const std::string& stage) {
    std::vector<std::vector<CommScheme>> schemes(res.plans.size());  // per plan, in entry order
    for (const CompareEntry& e : res.entries) {
        auto& s = schemes[e.plan_index];
        if (std::find(s.begin(), s.end(), e.row.scheme) == s.end()) s.push_back(e.row.scheme);
    }
    ReplayOptions ro;
    ro.num_threads = 1;
    std::vector<BatchedEval> evals;
    for (size_t i = 0; i < res.plans.size(); ++i) {
        ro.slot_maps = slot_maps[i];
        evals.emplace_back(res.plans[i], schedule,
                           schemes[i].empty() ? std::vector<CommScheme>{CommScheme::kHsc} : schemes[i],
                           options.hardware, shape, ro);
    }
    TraceReader reader(trace_path, overrides);
    reader.set_validation(false);  // the whole-trace pass has read the same tokens; the replay checks ids too
    const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
    const int P = static_cast<int>(evals.size());
    RoutingTrace chunk;
    int64_t first = 0, next = 0;
    const int64_t total = schedule.num_tokens();
    if (options.progress) options.progress(stage, 0, total);
    while (next < total && reader.next(std::min(options.chunk_tokens, total - next), chunk, &first)) {
        std::vector<std::string> errors(P);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int i = 0; i < P; ++i) {
            try {
                evals[i].consume(chunk, first);
            } catch (const std::exception& e) {
                errors[i] = e.what();
            }
        }
        for (const auto& e : errors) GRACE_CHECK_INPUT(e.empty(), e);
        next = first + chunk.num_tokens;
        if (options.progress) options.progress(stage, next, total);
    }
    for (CompareEntry& e : res.entries) {
        const auto& s = schemes[e.plan_index];
        const size_t at = std::find(s.begin(), s.end(), e.row.scheme) - s.begin();
        EvalReport r = evals[e.plan_index].report(at);
        r.dataset = res.dataset;
        r.policy = e.report.policy;
        e.workloads.push_back(std::move(r));
    }
}

}  // namespace

std::vector<CompareRow> default_compare_rows() {
    return {
        {"Occult", "occult+none+primary", CommScheme::kFlatDedup, true},
        {"Occult+HSC", "occult+none+primary", CommScheme::kHsc, true},
        {"HG+HSC", "hierarchical+none+primary", CommScheme::kHsc, true},
        {"+FR+WRR", "hierarchical+fixed+wrr", CommScheme::kHsc, true},
        {"+DR+WRR", "hierarchical+dynamic+wrr", CommScheme::kHsc, true},
        {"+DR+TAR", "hierarchical+dynamic+tar", CommScheme::kHsc, true},
        {"Vanilla", "vanilla+none+primary", CommScheme::kFlat, false},
        {"EPLB+vLLM", "eplb-hierarchical+eplb+vllm", CommScheme::kHsc, false},
        {"EPLB+SGLang", "eplb-hierarchical+eplb+sglang-static", CommScheme::kHsc, false},
        {"METIS", "metis+none+primary", CommScheme::kHsc, false},
        // Beyond the paper: DR repeated on the next heaviest GPU (spec §4's optional variant).
        {"+DR-iter+TAR", "hierarchical+dynamic-iter+tar", CommScheme::kHsc, false},
        // The default method: the node split, level-2 ratio and DR rounds chosen by priced time (issue #13).
        {"GRACE", "grace", CommScheme::kHsc, false},
    };
}

std::vector<CompareRow> engine_compare_rows(const std::string& engine) {
    const std::string name = to_string(parse_engine(engine));
    return {{"EPLB in " + name, "eplb-hierarchical+eplb@" + name, CommScheme::kHsc, false},
            {"GRACE in " + name, "grace@" + name, CommScheme::kHsc, false},
            {"GRACE native", "grace", CommScheme::kHsc, false}};
}

const CompareEntry* CompareResult::find(const std::string& name, const Topology& topology) const {
    for (const auto& e : entries)
        if (e.row.name == name && e.topology == topology) return &e;
    return nullptr;
}

CompareResult run_compare(const std::string& trace_path, const std::string& profile_path,
                          const TraceOverrides& overrides, const CompareOptions& options) {
    GRACE_CHECK_ARG(!options.topologies.empty(), "compare needs at least one topology");
    GRACE_CHECK_ARG(!options.rows.empty(), "compare needs at least one row");
    GRACE_CHECK_ARG(options.chunk_tokens >= 1, "chunk size must be at least 1 token");
    options.hardware.validate();
    bool reference_known = false;
    for (const CompareRow& row : options.rows) reference_known |= row.name == options.reference;
    GRACE_CHECK_ARG(reference_known, "reference row '", options.reference, "' is not one of the compared rows");
    auto report = [&](const std::string& stage, int64_t done, int64_t total) {
        if (options.progress) options.progress(stage, done, total);
    };
    CompareResult res;
    res.trace_path = trace_path;
    res.profile_path = profile_path.empty() ? trace_path : profile_path;
    res.reference = options.reference;
    res.hardware = options.hardware.name;

    // The evaluation trace's header first: a bad trace fails before the (long) profile.
    TraceReader reader(trace_path, overrides);
    res.model = reader.model();
    res.dataset = reader.dataset();
    res.num_tokens = reader.num_tokens();
    const ModelShape shape = options.shape ? *options.shape : resolve_model_shape(options.hardware, reader.model());
    check_model_shape(shape, reader.num_experts(), reader.num_layers(), "the trace");

    auto t0 = std::chrono::steady_clock::now();
    report("profiling", 0, 1);
    ProfileOptions po;
    po.num_threads = options.num_threads;
    // Gate weights given as an override belong to the evaluation trace: another profile trace has its own shape.
    TraceOverrides profile_overrides = overrides;
    if (res.profile_path != trace_path) profile_overrides.weights_path.reset();
    res.stats = profile_trace_file(res.profile_path, profile_overrides, po);
    res.profile_dataset = res.stats.dataset;
    GRACE_CHECK_INPUT(res.stats.num_experts == reader.num_experts() && res.stats.num_layers == reader.num_layers() &&
                          res.stats.top_k == reader.top_k(),
                      "the profile trace has ", res.stats.num_experts, " experts, ", res.stats.num_layers,
                      " layers and top_k = ", res.stats.top_k, " but the evaluation trace has ", reader.num_experts(),
                      ", ", reader.num_layers(), " and ", reader.top_k());
    report("profiling", 1, 1);
    res.seconds_profile = since(t0);

    t0 = std::chrono::steady_clock::now();
    std::map<std::pair<std::string, std::string>, int> plan_of;  // (method, topology) -> index, -1 = unsupported
    std::vector<std::vector<SlotMap>> slot_maps;                 // per plan: the engine's physical slots, or empty
    const int64_t num_plans = static_cast<int64_t>(options.topologies.size() * options.rows.size());
    int64_t done = 0;
    for (const Topology& topo : options.topologies) {
        for (const CompareRow& row : options.rows) {
            report("planning", done++, num_plans);
            const auto key = std::make_pair(row.method, topo.to_string());
            const size_t at = row.method.find('@');
            const std::string method = row.method.substr(0, at);
            const std::string engine = at == std::string::npos ? std::string() : row.method.substr(at + 1);
            if (!plan_of.count(key)) {
                PlanOptions opt;
                opt.method = method;
                opt.seed = options.seed;
                opt.num_threads = options.num_threads;
                // Priced plans (slot-exact fills, the default method) price like the rows are priced here.
                if (uses_pricing(opt, topo)) opt.pricing = placement_pricing(options.hardware, shape);
                // METIS keeps its random state in globals: concurrent per-layer calls race and the plan changes
                // from run to run, so METIS layers are planned one at a time.
                if (method.rfind("metis", 0) == 0) opt.num_threads = 1;
                try {
                    res.plans.push_back(make_plan(res.stats, topo, opt));
                    slot_maps.emplace_back();
                    if (!engine.empty()) {
                        // What the engine runs: the export (padded to the topology's slots, by the profiled
                        // loads, as `grace export --stats`) with the engine's own replica choice.
                        const RoutingPolicy policy = engine_policy(parse_engine(engine));
                        EngineDeployment dep = deploy_to_engine(
                            res.plans.back(), policy, std::vector<double>(res.stats.load.begin(), res.stats.load.end()),
                            topo.slots_per_gpu.value_or(0));
                        dep.plan.method = res.plans.back().method + "@" + engine;
                        res.plans.back() = std::move(dep.plan);
                        slot_maps.back() = std::move(dep.slot_maps);
                    }
                    plan_of[key] = static_cast<int>(res.plans.size()) - 1;
                } catch (const Error& e) {
                    if (e.code() != ErrorCode::kUnsupported) throw;
                    plan_of[key] = -1;
                    res.notes.push_back(cat(row.name, " on ", topo.to_string(), " skipped: ", e.what()));
                }
            }
            const int idx = plan_of[key];
            if (idx < 0) continue;
            CompareEntry entry;
            entry.row = row;
            entry.topology = topo;
            entry.plan_index = idx;
            res.entries.push_back(std::move(entry));
        }
    }
    report("planning", num_plans, num_plans);
    res.seconds_plan = since(t0);

    // One streamed pass over the evaluation trace feeds every plan; (plan, layer) pairs run in parallel.
    t0 = std::chrono::steady_clock::now();
    ReplayOptions ro;
    ro.num_threads = 1;
    std::vector<Replayer> replayers;
    for (size_t i = 0; i < res.plans.size(); ++i) {
        ro.slot_maps = slot_maps[i];
        replayers.emplace_back(res.plans[i], res.num_tokens, ro);
    }
    const int L = reader.num_layers();
    const int tasks = static_cast<int>(replayers.size()) * L;
    const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
    RoutingTrace chunk;
    int64_t first = 0;
    report("replaying", 0, res.num_tokens);
    while (reader.next(options.chunk_tokens, chunk, &first)) {
        std::vector<std::string> errors(tasks);
        const LayerMajorIds lm(chunk, threads);
        const int P = static_cast<int>(replayers.size());
        // Layer-major task order: the plans replaying one layer share its ids while they are in cache.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int task = 0; task < tasks; ++task) {
            try {
                replayers[task % P].consume_layer_ids(lm.layer(task / P), chunk.top_k, chunk.num_tokens, chunk.top_k,
                                                      first, task / P);
            } catch (const std::exception& e) {
                errors[task] = e.what();
            }
        }
        for (const auto& e : errors) GRACE_CHECK_INPUT(e.empty(), e);
        report("replaying", first + chunk.num_tokens, res.num_tokens);
    }
    std::vector<std::vector<LayerCounts>> counts;
    for (const auto& r : replayers) counts.push_back(r.counts());
    for (auto& entry : res.entries) {
        const ExpertPlan& plan = res.plans[entry.plan_index];
        entry.report =
            price_counts(counts[entry.plan_index], plan, entry.row.scheme, options.hardware, shape, res.num_tokens);
        entry.report.dataset = res.dataset;
        entry.report.policy = to_string(plan.layers[0].policy);
    }
    // The serving workloads: each batch priced on its own (prefill and decode), the routers carried across.
    for (const WorkloadSpec& w : options.workloads) {
        if (w.tokens_per_round() > res.num_tokens) {
            res.notes.push_back(cat("workload ", to_string(w), " skipped: it needs ", w.tokens_per_round(),
                                    " tokens but the trace has ", res.num_tokens));
            continue;
        }
        BatchingOptions bo;
        bo.workload = w;
        res.workloads.push_back(make_batch_schedule(res.num_tokens, bo));
        evaluate_workload(res, res.workloads.back(), trace_path, overrides, slot_maps, shape, options,
                          "workload " + to_string(w));
    }
    res.seconds_replay = since(t0);
    return res;
}

namespace {

// The end-to-end time of one phase of a workload report (0 when it has no batches of that phase).
double phase_e2e(const EvalReport& r, BatchPhase phase) {
    for (const PhaseReport& p : r.phases)
        if (p.phase == phase) return p.total.end_to_end_s;
    return 0;
}

// Per topology: each row's whole-trace end-to-end time and, per workload, prefill + decode = total and the
// speedup of the total against the reference row's.
std::string format_workload_table(const CompareResult& r, const Topology& topo, int name_width) {
    if (r.workloads.empty()) return "";
    std::string out = "end-to-end ms by workload (";
    for (size_t w = 0; w < r.workloads.size(); ++w) {
        const BatchSchedule& b = r.workloads[w];
        out += (w ? "; " : "") + to_string(*b.workload) + ": " + std::to_string(b.rounds) + " round" +
               (b.rounds == 1 ? "" : "s") + " of " + std::to_string(b.tokens_per_round) + " tokens";
    }
    out += ")\n";
    char buf[256];
    std::snprintf(buf, sizeof buf, "%-*s %11s", name_width, "row", "whole trace");
    out += buf;
    for (const BatchSchedule& b : r.workloads) {
        const std::string w = to_string(*b.workload);
        std::snprintf(buf, sizeof buf, " | %18s %9s %9s %7s", (w + " prefill").c_str(), "decode", "total", "speedup");
        out += buf;
    }
    out += "\n";
    const CompareEntry* ref = r.find(r.reference, topo);
    for (const auto& e : r.entries) {
        if (!(e.topology == topo)) continue;
        std::snprintf(buf, sizeof buf, "%-*s %11.2f", name_width, e.row.name.c_str(),
                      e.report.total.end_to_end_s * 1e3);
        out += buf;
        for (size_t w = 0; w < e.workloads.size(); ++w) {
            const EvalReport& wr = e.workloads[w];
            const double sp = ref && w < ref->workloads.size() && wr.total.end_to_end_s > 0
                                  ? ref->workloads[w].total.end_to_end_s / wr.total.end_to_end_s
                                  : 0;
            std::snprintf(buf, sizeof buf, " | %18.2f %9.2f %9.2f %6.2fx", phase_e2e(wr, BatchPhase::kPrefill) * 1e3,
                          phase_e2e(wr, BatchPhase::kDecode) * 1e3, wr.total.end_to_end_s * 1e3, sp);
            out += buf;
        }
        out += "\n";
    }
    return out;
}

}  // namespace

std::string format_compare_table(const CompareResult& r) {
    std::string out;
    char buf[512];
    std::vector<Topology> topos;
    for (const auto& e : r.entries)
        if (std::find(topos.begin(), topos.end(), e.topology) == topos.end()) topos.push_back(e.topology);
    int name_width = 12;  // engine rows ("GRACE in vllm-ascend") are longer than the paper's
    for (const auto& e : r.entries) name_width = std::max(name_width, static_cast<int>(e.row.name.size()));
    for (const Topology& topo : topos) {
        std::snprintf(buf, sizeof buf, "\n== %s on %s: planned on %s, evaluated on %s (%lld tokens), hardware %s ==\n",
                      r.model.c_str(), topo.to_string().c_str(), r.profile_dataset.c_str(), r.dataset.c_str(),
                      static_cast<long long>(r.num_tokens), r.hardware.c_str());
        out += buf;
        std::snprintf(buf, sizeof buf, "%-*s %-10s %12s %12s %9s %9s %9s %9s %9s %8s %8s\n", name_width, "row", "comm",
                      "cross copies", "intra copies", "a2a ms", "idle ms", "load std", "MoE ms", "e2e ms", "cross%",
                      "speedup");
        out += buf;
        const CompareEntry* ref = r.find(r.reference, topo);
        for (const auto& e : r.entries) {
            if (!(e.topology == topo)) continue;
            const EvalMetrics& t = e.report.total;
            double dc = ref ? rel(static_cast<double>(t.cross_node_copies),
                                  static_cast<double>(ref->report.total.cross_node_copies))
                            : 0;
            double sp = ref && t.end_to_end_s > 0 ? ref->report.total.end_to_end_s / t.end_to_end_s : 0;
            std::snprintf(buf, sizeof buf, "%-*s %-10s %12lld %12lld %9.2f %9.3f %9.1f %9.2f %9.2f %+7.1f%% %7.2fx\n",
                          name_width, e.row.name.c_str(), to_string(e.row.scheme).c_str(),
                          static_cast<long long>(t.cross_node_copies), static_cast<long long>(t.intra_node_copies),
                          t.all_to_all_time_s * 1e3, t.gpu_idle_time_s * 1e3, t.load_std, t.moe_layer_time_s * 1e3,
                          t.end_to_end_s * 1e3, 100 * dc, sp);
            out += buf;
        }
        out += format_workload_table(r, topo, name_width);
    }
    for (const auto& n : r.notes) out += "note: " + n + "\n";
    return out;
}

namespace {

json totals_json(const EvalMetrics& t) {
    return {{"cross_node_copies", t.cross_node_copies},
            {"intra_node_copies", t.intra_node_copies},
            {"local_selections", t.local_selections},
            {"cross_node_bytes", t.cross_node_bytes},
            {"intra_node_bytes", t.intra_node_bytes},
            {"cross_node_ratio", t.cross_node_ratio},
            {"load_std", t.load_std},
            {"balancedness", t.balancedness},
            {"imbalance_ratio", t.imbalance_ratio},
            {"dispatch_time_s", t.dispatch_time_s},
            {"combine_time_s", t.combine_time_s},
            {"all_to_all_time_s", t.all_to_all_time_s},
            {"compute_time_s", t.compute_time_s},
            {"gpu_idle_time_s", t.gpu_idle_time_s},
            {"moe_layer_time_s", t.moe_layer_time_s},
            {"non_moe_time_s", t.non_moe_time_s},
            {"end_to_end_s", t.end_to_end_s},
            {"gpu_load", t.gpu_load}};
}

}  // namespace

std::vector<std::string> save_compare_plans(const CompareResult& r, const std::string& dir) {
    const std::filesystem::path folder = std::filesystem::path(dir) / "plans";
    std::filesystem::create_directories(folder);
    std::vector<std::string> out;
    for (const auto& plan : r.plans) {
        std::string name = plan.method + "-" + plan.topology.to_string();
        std::replace(name.begin(), name.end(), '+', '_');
        std::replace(name.begin(), name.end(), ':', '_');
        out.push_back((folder / (name + ".json")).string());
        save_plan(plan, out.back());
    }
    return out;
}

std::string compare_to_json(const CompareResult& r) {
    json j;
    j["format"] = "grace.compare/v1";
    j["trace"] = r.trace_path;
    j["profile_trace"] = r.profile_path;
    j["model"] = r.model;
    j["dataset"] = r.dataset;
    j["profile_dataset"] = r.profile_dataset;
    j["num_tokens"] = r.num_tokens;
    j["hardware"] = r.hardware;
    j["reference"] = r.reference;
    j["notes"] = r.notes;
    json workloads = json::array();
    for (const BatchSchedule& b : r.workloads)
        workloads.push_back(
            {{"workload", to_string(*b.workload)}, {"rounds", b.rounds}, {"num_tokens", b.num_tokens()}});
    j["workloads"] = std::move(workloads);
    json entries = json::array();
    for (const auto& e : r.entries) {
        json je;
        je["name"] = e.row.name;
        je["method"] = e.row.method;
        je["scheme"] = to_string(e.row.scheme);
        je["table1"] = e.row.table1;
        je["topology"] = e.topology.to_string();
        je["compute_model"] = e.report.compute_model;
        je["total"] = totals_json(e.report.total);
        if (const CompareEntry* ref = r.find(r.reference, e.topology)) {
            json rj;
            for (const auto& m : kRelMetrics) rj[m.key] = rel(m.get(e.report.total), m.get(ref->report.total));
            rj["end_to_end_speedup"] =
                e.report.total.end_to_end_s > 0 ? ref->report.total.end_to_end_s / e.report.total.end_to_end_s : 0;
            je["relative_to_reference"] = rj;
        }
        const CompareEntry* ref = r.find(r.reference, e.topology);
        json jw = json::array();
        for (size_t w = 0; w < e.workloads.size(); ++w) {
            const EvalReport& wr = e.workloads[w];
            json x;
            x["workload"] = to_string(*wr.schedule.workload);
            x["total"] = totals_json(wr.total);
            for (const PhaseReport& p : wr.phases) x[to_string(p.phase)] = totals_json(p.total);
            x["end_to_end_speedup"] = ref && w < ref->workloads.size() && wr.total.end_to_end_s > 0
                                          ? ref->workloads[w].total.end_to_end_s / wr.total.end_to_end_s
                                          : 0;
            jw.push_back(std::move(x));
        }
        je["workloads"] = std::move(jw);
        entries.push_back(std::move(je));
    }
    j["entries"] = std::move(entries);
    return j.dump(1) + "\n";
}

std::string compare_to_csv(const CompareResult& r) {
    std::string s =
        "topology,name,method,scheme,cross_node_copies,intra_node_copies,cross_node_bytes,intra_node_bytes,"
        "all_to_all_time_s,gpu_idle_time_s,load_std,balancedness,imbalance_ratio,moe_layer_time_s,"
        "end_to_end_s";
    for (const auto& m : kRelMetrics) s += std::string(",rel_") + m.key;
    s += ",end_to_end_speedup";
    for (const BatchSchedule& b : r.workloads)
        for (const char* c : {"_prefill_end_to_end_s", "_decode_end_to_end_s", "_end_to_end_s", "_all_to_all_time_s",
                              "_end_to_end_speedup"})
            s.append(",").append(to_string(*b.workload)).append(c);
    s += "\n";
    char buf[64];
    auto num = [&](double v) {
        std::snprintf(buf, sizeof buf, "%.9g", v);
        return std::string(buf);
    };
    for (const auto& e : r.entries) {
        const EvalMetrics& t = e.report.total;
        s += e.topology.to_string() + "," + e.row.name + "," + e.row.method + "," + to_string(e.row.scheme) + "," +
             std::to_string(t.cross_node_copies) + "," + std::to_string(t.intra_node_copies) + "," +
             std::to_string(t.cross_node_bytes) + "," + std::to_string(t.intra_node_bytes) + "," +
             num(t.all_to_all_time_s) + "," + num(t.gpu_idle_time_s) + "," + num(t.load_std) + "," +
             num(t.balancedness) + "," + num(t.imbalance_ratio) + "," + num(t.moe_layer_time_s) + "," +
             num(t.end_to_end_s);
        const CompareEntry* ref = r.find(r.reference, e.topology);
        // Appended piece by piece: `"," + std::string&&` trips GCC 12's -Wrestrict false positive.
        for (const auto& m : kRelMetrics) {
            s += ',';
            if (ref) s += num(rel(m.get(t), m.get(ref->report.total)));
        }
        s += ',';
        if (ref && t.end_to_end_s > 0) s += num(ref->report.total.end_to_end_s / t.end_to_end_s);
        for (size_t w = 0; w < e.workloads.size(); ++w) {
            const EvalReport& wr = e.workloads[w];
            for (double v : {phase_e2e(wr, BatchPhase::kPrefill), phase_e2e(wr, BatchPhase::kDecode),
                             wr.total.end_to_end_s, wr.total.all_to_all_time_s})
                s.append(",").append(num(v));
            s += ',';
            if (ref && w < ref->workloads.size() && wr.total.end_to_end_s > 0)
                s += num(ref->workloads[w].total.end_to_end_s / wr.total.end_to_end_s);
        }
        s += '\n';
    }
    return s;
}

}  // namespace grace
