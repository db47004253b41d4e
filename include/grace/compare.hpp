#pragma once
/// @file compare.hpp
/// The paper's component analysis (Table 1, Figure 5) and the ecosystem baselines on one trace: profile a
/// (profile-)trace, plan with every method, replay the evaluation trace once through every plan (streamed, all
/// plans and layers in parallel) and price each row under its communication scheme. Also writes the report:
/// compare.json, compare.csv, SVG figures and report.html (docs/formats.md).

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "grace/eval.hpp"
#include "grace/hardware.hpp"
#include "grace/plan.hpp"
#include "grace/stats.hpp"
#include "grace/topology.hpp"
#include "grace/trace.hpp"

namespace grace {

/// One row of the comparison: a planning method and the communication it runs with.
struct CompareRow {
    std::string name;  ///< display name, e.g. "+DR+TAR"
    /// Planner method spec, e.g. "hierarchical+dynamic+tar"; "METHOD@ENGINE" (ENGINE: sglang, vllm,
    /// vllm-ascend, trtllm) evaluates the plan's export as that engine runs it (engine_eval.hpp).
    std::string method;
    CommScheme scheme = CommScheme::kHsc;
    bool table1 = false;  ///< one of the paper's Table 1 columns
};

/// The default rows, in order: Occult (occult+none+primary, flat-dedup), Occult+HSC, HG+HSC
/// (hierarchical+none+primary), +FR+WRR (hierarchical+fixed+wrr), +DR+WRR (hierarchical+dynamic+wrr), +DR+TAR
/// (hierarchical+dynamic+tar = grace), all on hsc after the first; then Vanilla (vanilla, flat), EPLB+vLLM
/// (eplb-hierarchical+eplb+vllm, hsc), EPLB+SGLang (eplb-hierarchical+eplb+sglang-static, hsc) and METIS
/// (metis+none+primary, hsc). The EPLB and METIS rows use hsc so that they differ from GRACE only in placement
/// and routing (DeepEP's internode kernels, which vLLM and SGLang use, also send one copy per node).
std::vector<CompareRow> default_compare_rows();

/// The rows of `grace compare --engine NAME`: "EPLB in NAME" (eplb-hierarchical+eplb, exported, NAME's routing),
/// "GRACE in NAME" (grace, exported, NAME's routing) and "GRACE native" (grace with TAR), all on hsc.
std::vector<CompareRow> engine_compare_rows(const std::string& engine);

/// What run_compare reports as it goes: a stage name and its progress.
using CompareProgress = std::function<void(const std::string& stage, int64_t done, int64_t total)>;

/// Options of a comparison.
struct CompareOptions {
    std::vector<Topology> topologies;  ///< e.g. {2x2, 2x4}
    HardwareModel hardware;            ///< cost model
    std::vector<CompareRow> rows = default_compare_rows();
    std::string reference = "Occult";  ///< row the relative changes are taken against
    uint64_t seed = 0;                 ///< planner seed
    int num_threads = 0;               ///< 0 = all; results identical for any count
    int64_t chunk_tokens = 1 << 15;    ///< tokens per streamed chunk
    std::optional<ModelShape> shape;   ///< unset = resolve_model_shape(hardware, trace model)
    CompareProgress progress;          ///< optional
    /// Serving workloads priced batch by batch besides the whole trace (BatchedEval, every whole round the trace
    /// holds); one the trace is too short for is skipped and named in CompareResult::notes.
    std::vector<WorkloadSpec> workloads = paper_workloads();
};

/// One evaluated (row, topology).
struct CompareEntry {
    CompareRow row;
    Topology topology;
    EvalReport report;                  ///< the whole trace as one batch
    std::vector<EvalReport> workloads;  ///< [CompareResult::workloads]: the same plan under each workload
    int plan_index = -1;  ///< into CompareResult::plans
};

/// A whole comparison.
struct CompareResult {
    std::string trace_path, profile_path;
    std::string model, dataset, profile_dataset;
    int64_t num_tokens = 0;
    std::string reference;
    std::string hardware;
    RoutingStats stats;                 ///< profile of the profile trace
    std::vector<ExpertPlan> plans;      ///< every distinct (method, engine, topology) plan; an engine row's plan is
                                        ///< its engine deployment (method "METHOD@ENGINE")
    std::vector<CompareEntry> entries;  ///< rows x topologies, topology-major
    std::vector<BatchSchedule> workloads;  ///< the workloads evaluated (long enough a trace), in options order
    std::vector<std::string> notes;     ///< rows that could not be planned (e.g. METIS not built), with why
    double seconds_profile = 0, seconds_plan = 0, seconds_replay = 0;  ///< wall time of each stage

    /// The entry of row `name` on `topology`, or nullptr.
    const CompareEntry* find(const std::string& name, const Topology& topology) const;
};

/// Runs the comparison: profiles `profile_path` (or `trace_path` when empty), plans every row on every topology
/// and evaluates on `trace_path`. `overrides` apply to both traces, except `weights_path`, which belongs to
/// `trace_path` only. Throws as load_trace / make_plan / evaluate, kInvalidArgument for a reference that is not
/// a row, kInvalidInput when the two traces differ in E, L or k; a row whose method is not supported in this
/// build (kUnsupported) is skipped and named in `notes`.
CompareResult run_compare(const std::string& trace_path, const std::string& profile_path,
                          const TraceOverrides& overrides, const CompareOptions& options);

/// The comparison table for a terminal: one block per topology, a row per method with cross/intra copies,
/// all-to-all, idle, MoE layer and end-to-end times and the change against the reference; then, with workloads,
/// a row per method with the whole trace's end-to-end time and each workload's prefill, decode and total time.
std::string format_compare_table(const CompareResult& result);

/// compare.json: {"format": "grace.compare/v1", ..., "workloads": [{"workload", "rounds", "num_tokens"}],
/// "entries": [{"name", "method", "scheme", "topology", "total": {...eval totals...}, "relative": {metric: change
/// vs reference}, "workloads": [{"workload", "total", "prefill", "decode", "end_to_end_speedup"}]}]}.
std::string compare_to_json(const CompareResult& result);
/// compare.csv: one line per entry with the totals and the relative changes, then per workload W the columns
/// W_prefill_end_to_end_s, W_decode_end_to_end_s, W_end_to_end_s, W_all_to_all_time_s, W_end_to_end_speedup.
std::string compare_to_csv(const CompareResult& result);

/// Writes every plan of the comparison to `dir`/plans/METHOD-NxM.json ('+' and ':' in the method become '_'),
/// so that `grace eval` can replay any row later. Returns the paths written. Throws kIo.
std::vector<std::string> save_compare_plans(const CompareResult& result, const std::string& dir);

/// A titled comparison for the report.
struct ReportSection {
    std::string title;
    std::string description;
    const CompareResult* result = nullptr;
    bool figures = true;  ///< draw the figures of this section
};

/// Writes into folder `dir` (which must exist): for each section i, `compare{i}.json/.csv` (`compare.json`
/// and `compare.csv` for the first), the SVG figures `fig{i}_*.svg`, and one report.html tying them together.
/// All files are committed together (an OutputSet, grace/io.hpp), report.html last. Returns the paths written.
std::vector<std::string> write_report(const std::vector<ReportSection>& sections, const std::string& dir,
                                      const std::string& title);

}  // namespace grace
