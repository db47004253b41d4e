#pragma once
/// @file hardware.hpp
/// The hardware description the evaluator prices traffic and compute with (spec §7).
///
/// On disk a hardware file is JSON, `grace.hardware/v1` (documented in docs/formats.md):
/// ```
/// { "format": "grace.hardware/v1", "name": "a100-testbed", "description": "...",
///   "element_size": 2,                                  // bytes per activation element (bf16)
///   "intra_node": {"bandwidth_GBps": 600, "latency_us": 5},   // per GPU per direction (NVLink)
///   "cross_node": {"bandwidth_Gbps": 25,  "latency_us": 30},  // per node per direction (NIC)
///   "compute": {"peak_tflops": 200, "n_half": 100},     // analytic expert GEMM model (below)
///   "gemm_table": {"device": "...", "shapes": {"olmoe": {"hidden": 2048, "intermediate": 1024,
///                  "tokens": [...], "seconds": [...]}}},  // optional; or a path to such a file
///   "non_moe_seconds_per_token": 1e-7,                  // optional; default 8*H^2/peak
///   "hidden": 2048, "intermediate": 1024 }              // optional; default: the trace's model preset
/// ```
/// A link gives its bandwidth as exactly one of `bandwidth_GBps` (1e9 bytes/s) or `bandwidth_Gbps`
/// (1e9 bits/s). The expert GEMM time of an instance that receives n tokens is taken from the table of the
/// evaluated model (matched by model name, else by hidden/intermediate size), piecewise linear in n
/// (constant below the first point, extended with the last slope beyond the last), or else the analytic
/// default f(n) = 6*H*I*n / (peak * n/(n + n_half)) = 6*H*I*(n + n_half)/peak; f(0) = 0 in both cases.
/// Presets are embedded in the binary: `a100-testbed` (the paper's testbed) and `h100-ib`.

#include <map>
#include <string>
#include <vector>

namespace grace {

/// Measured grouped-GEMM time of one expert (gate, up and down projections) against its token count.
struct GemmTable {
    int hidden = 0;               ///< H the table was measured at
    int intermediate = 0;         ///< I the table was measured at
    std::vector<double> tokens;   ///< ascending token counts, >= 1
    std::vector<double> seconds;  ///< time per expert at each count, > 0, same length as tokens
};

/// Link, compute and model-shape parameters of the cost model. All times in seconds, bandwidths in bytes/s.
struct HardwareModel {
    std::string name;                              ///< preset or file name
    std::string description;                       ///< free text
    int element_size = 2;                          ///< bytes per activation element
    double intra_node_bandwidth = 0;               ///< B_nvl: bytes/s per GPU per direction
    double intra_node_latency = 0;                 ///< alpha per intra-node message, s
    double cross_node_bandwidth = 0;               ///< B_net: bytes/s per node per direction, shared by its GPUs
    double cross_node_latency = 0;                 ///< alpha per cross-node message, s
    double peak_flops = 0;                         ///< achievable expert GEMM flop/s of one GPU (analytic model)
    double n_half = 0;                             ///< tokens at which the analytic GEMM reaches half of peak
    std::string gemm_device;                       ///< device the table was measured on (informational)
    std::map<std::string, GemmTable> gemm_tables;  ///< by model name
    double non_moe_seconds_per_token = -1;         ///< per token per layer on one GPU; < 0 = default 8*H^2/peak
    int hidden = 0;                                ///< H override; 0 = from the trace's model preset
    int intermediate = 0;                          ///< I override; 0 = from the trace's model preset

    /// Throws kInvalidInput naming the first bad field: non-positive bandwidth, peak or element size,
    /// negative latency or n_half, a table that is empty, unsorted, of unequal lengths or non-positive.
    void validate() const;
};

/// The expert-compute and non-MoE time functions of one model shape on one hardware model.
class ComputeModel {
  public:
    /// Chooses the GEMM table for `model` (by name, else by H/I), else the analytic default.
    ComputeModel(const HardwareModel& hardware, const std::string& model, int hidden, int intermediate);
    /// Seconds for one expert instance to process n tokens; 0 for n = 0.
    double expert_seconds(int64_t n) const;
    /// Seconds of non-MoE work per token per layer.
    double non_moe_seconds_per_token() const { return non_moe_; }
    /// "table:<model>" or "analytic".
    const std::string& source() const { return source_; }

  private:
    const GemmTable* table_ = nullptr;
    GemmTable table_copy_;
    double flops_per_token_ = 0;
    double peak_ = 0;
    double n_half_ = 0;
    double non_moe_ = 0;
    std::string source_;
};

/// Names of the embedded presets, in a fixed order ("a100-testbed", "h100-ib").
const std::vector<std::string>& hardware_presets();

/// Parses `grace.hardware/v1` JSON. `base_dir` resolves a relative `gemm_table` path. Throws kInvalidInput
/// naming a missing or bad field (one line).
HardwareModel parse_hardware(const std::string& json_text, const std::string& base_dir = ".");

/// A preset name or a path to a hardware JSON file. Throws kInvalidArgument for an unknown name that is not a
/// file, kIo / kInvalidInput for an unreadable or bad file.
HardwareModel load_hardware(const std::string& name_or_path);

/// The JSON of a hardware model (tables included), as parse_hardware reads it.
std::string hardware_to_json(const HardwareModel& hardware);

}  // namespace grace
