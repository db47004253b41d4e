#include "grace/hardware.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/json_read.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"

using json = nlohmann::ordered_json;

namespace grace {

namespace {

const char* kFormat = "grace.hardware/v1";

// The paper's testbed (Sec. 6.1): A100-SXM4-80GB, NVLink 12 links x 50 GB/s per direction (the paper's
// figure; spec §7 default), 25 Gbit/s Ethernet between nodes. GEMM: 200 TFLOP/s achievable of the 312 bf16
// peak; n_half = peak / HBM bandwidth (2.0 TB/s) = 100 tokens, where reading the weights costs as much as
// the math. Latencies are typical NCCL figures (NVLink p2p, TCP over Ethernet).
const char* kA100Testbed = R"({
  "format": "grace.hardware/v1",
  "name": "a100-testbed",
  "description": "Paper testbed: A100-SXM4-80GB, NVLink 12 x 50 GB/s per GPU per direction, 25 Gbit/s Ethernet per node",
  "element_size": 2,
  "intra_node": {"bandwidth_GBps": 600, "latency_us": 5},
  "cross_node": {"bandwidth_Gbps": 25, "latency_us": 30},
  "compute": {"peak_tflops": 200, "n_half": 100}
})";

// An H100/H200 HGX node: NVLink4 900 GB/s bidirectional = 450 GB/s per direction per GPU; one 400 Gbit/s
// InfiniBand port per node (raise cross_node for one NIC per GPU). GEMM: 600 TFLOP/s achievable of the 989
// bf16 dense peak; n_half = 600e12 / 3.35e12 B/s ~ 180 tokens.
const char* kH100Ib = R"({
  "format": "grace.hardware/v1",
  "name": "h100-ib",
  "description": "H100/H200 HGX node: NVLink 450 GB/s per GPU per direction, 400 Gbit/s InfiniBand per node",
  "element_size": 2,
  "intra_node": {"bandwidth_GBps": 450, "latency_us": 3},
  "cross_node": {"bandwidth_Gbps": 400, "latency_us": 5},
  "compute": {"peak_tflops": 600, "n_half": 180}
})";

double number(const json& j, const char* key, const std::string& where) {
    GRACE_CHECK_INPUT(j.contains(key), "hardware: missing field ", where, key);
    GRACE_CHECK_INPUT(j[key].is_number(), "hardware: field ", where, key, " must be a number");
    return j[key].get<double>();
}

// Integers through detail::json_int: 64-bit, range-checked, errors name the field (a cast of a huge double
// to int would be undefined).
int integer(const json& j, const char* key, const std::string& where, int lo) {
    GRACE_CHECK_INPUT(j.contains(key), "hardware: missing field ", where, key);
    return detail::json_int(j[key], "hardware", where + key, lo, detail::kInt32Max);
}

double bandwidth(const json& link, const std::string& where) {
    GRACE_CHECK_INPUT(link.is_object(), "hardware: field ", where, " must be an object with bandwidth and latency");
    const bool bytes = link.contains("bandwidth_GBps"), bits = link.contains("bandwidth_Gbps");
    GRACE_CHECK_INPUT(bytes != bits, "hardware: ", where, " needs exactly one of bandwidth_GBps or bandwidth_Gbps");
    double v = bytes ? number(link, "bandwidth_GBps", where + ".") * 1e9
                     : number(link, "bandwidth_Gbps", where + ".") * 1e9 / 8;
    GRACE_CHECK_INPUT(std::isfinite(v) && v > 0, "hardware: ", where, " bandwidth must be positive, got ",
                      bytes ? link["bandwidth_GBps"].dump() : link["bandwidth_Gbps"].dump());
    return v;
}

GemmTable parse_table(const json& s, const std::string& name) {
    GemmTable t;
    const std::string where = "gemm_table.shapes." + name + ".";
    t.hidden = integer(s, "hidden", where, 1);
    t.intermediate = integer(s, "intermediate", where, 1);
    GRACE_CHECK_INPUT(s.contains("tokens") && s["tokens"].is_array(), "hardware: missing array ", where, "tokens");
    GRACE_CHECK_INPUT(s.contains("seconds") && s["seconds"].is_array(), "hardware: missing array ", where, "seconds");
    for (const auto& v : s["tokens"]) {
        GRACE_CHECK_INPUT(v.is_number(), "hardware: ", where, "tokens must hold numbers");
        t.tokens.push_back(v.get<double>());
    }
    for (const auto& v : s["seconds"]) {
        GRACE_CHECK_INPUT(v.is_number(), "hardware: ", where, "seconds must hold numbers");
        t.seconds.push_back(v.get<double>());
    }
    return t;
}

void parse_tables(const json& tables, HardwareModel& hw) {
    GRACE_CHECK_INPUT(tables.is_object() && tables.contains("shapes") && tables["shapes"].is_object(),
                      "hardware: gemm_table needs a \"shapes\" object");
    if (tables.contains("device") && tables["device"].is_string()) hw.gemm_device = tables["device"].get<std::string>();
    for (auto it = tables["shapes"].begin(); it != tables["shapes"].end(); ++it)
        hw.gemm_tables[it.key()] = parse_table(it.value(), it.key());
}

}  // namespace

void HardwareModel::validate() const {
    GRACE_CHECK_INPUT(element_size >= 1, "hardware ", name, ": element_size must be positive, got ", element_size);
    GRACE_CHECK_INPUT(std::isfinite(intra_node_bandwidth) && intra_node_bandwidth > 0, "hardware ", name,
                      ": intra-node bandwidth must be positive, got ", intra_node_bandwidth);
    GRACE_CHECK_INPUT(std::isfinite(cross_node_bandwidth) && cross_node_bandwidth > 0, "hardware ", name,
                      ": cross-node bandwidth must be positive, got ", cross_node_bandwidth);
    GRACE_CHECK_INPUT(std::isfinite(intra_node_latency) && intra_node_latency >= 0, "hardware ", name,
                      ": intra-node latency must be >= 0, got ", intra_node_latency);
    GRACE_CHECK_INPUT(std::isfinite(cross_node_latency) && cross_node_latency >= 0, "hardware ", name,
                      ": cross-node latency must be >= 0, got ", cross_node_latency);
    GRACE_CHECK_INPUT(std::isfinite(peak_flops) && peak_flops > 0, "hardware ", name,
                      ": compute peak must be positive, got ", peak_flops);
    GRACE_CHECK_INPUT(std::isfinite(n_half) && n_half >= 0, "hardware ", name, ": n_half must be >= 0, got ", n_half);
    GRACE_CHECK_INPUT(hidden >= 0 && intermediate >= 0, "hardware ", name, ": hidden/intermediate must be >= 0");
    for (const auto& [model, t] : gemm_tables) {
        GRACE_CHECK_INPUT(!t.tokens.empty() && t.tokens.size() == t.seconds.size(), "hardware ", name, ": GEMM table ",
                          model, " needs equally long, non-empty tokens and seconds");
        GRACE_CHECK_INPUT(t.hidden > 0 && t.intermediate > 0, "hardware ", name, ": GEMM table ", model,
                          " needs positive hidden and intermediate");
        for (size_t i = 0; i < t.tokens.size(); ++i) {
            GRACE_CHECK_INPUT(
                std::isfinite(t.tokens[i]) && t.tokens[i] >= 1 && (i == 0 || t.tokens[i] > t.tokens[i - 1]),
                "hardware ", name, ": GEMM table ", model, " tokens must be >= 1 and strictly ascending");
            GRACE_CHECK_INPUT(std::isfinite(t.seconds[i]) && t.seconds[i] > 0, "hardware ", name, ": GEMM table ",
                              model, " seconds must be positive, got ", t.seconds[i]);
        }
    }
}

HardwareModel parse_hardware(const std::string& json_text, const std::string& base_dir) {
    json j;
    try {
        j = json::parse(json_text);
    } catch (const json::exception& e) {
        throw Error(ErrorCode::kInvalidInput, cat("hardware: not valid JSON (", e.what(), ")"));
    }
    GRACE_CHECK_INPUT(j.is_object(), "hardware: expected a JSON object");
    GRACE_CHECK_INPUT(j.value("format", std::string()) == kFormat, "hardware: field \"format\" must be \"", kFormat,
                      "\"");
    HardwareModel hw;
    hw.name = j.value("name", std::string("custom"));
    hw.description = j.value("description", std::string());
    hw.element_size = integer(j, "element_size", "", 1);
    GRACE_CHECK_INPUT(j.contains("intra_node"), "hardware: missing field intra_node");
    GRACE_CHECK_INPUT(j.contains("cross_node"), "hardware: missing field cross_node");
    hw.intra_node_bandwidth = bandwidth(j["intra_node"], "intra_node");
    hw.cross_node_bandwidth = bandwidth(j["cross_node"], "cross_node");
    hw.intra_node_latency = number(j["intra_node"], "latency_us", "intra_node.") * 1e-6;
    hw.cross_node_latency = number(j["cross_node"], "latency_us", "cross_node.") * 1e-6;
    GRACE_CHECK_INPUT(j.contains("compute") && j["compute"].is_object(), "hardware: missing field compute");
    hw.peak_flops = number(j["compute"], "peak_tflops", "compute.") * 1e12;
    hw.n_half = number(j["compute"], "n_half", "compute.");
    if (j.contains("gemm_table")) {
        const json& g = j["gemm_table"];
        if (g.is_string()) {
            std::filesystem::path p = g.get<std::string>();
            if (p.is_relative()) p = std::filesystem::path(base_dir) / p;
            json t;
            try {
                t = json::parse(read_text(p.string()));
            } catch (const json::exception& e) {
                throw Error(ErrorCode::kInvalidInput, cat("hardware: GEMM table ", p.string(), " is not valid JSON"));
            }
            parse_tables(t, hw);
        } else {
            parse_tables(g, hw);
        }
    }
    if (j.contains("non_moe_seconds_per_token"))
        hw.non_moe_seconds_per_token = number(j, "non_moe_seconds_per_token", "");
    if (j.contains("hidden")) hw.hidden = integer(j, "hidden", "", 0);
    if (j.contains("intermediate")) hw.intermediate = integer(j, "intermediate", "", 0);
    hw.validate();
    return hw;
}

namespace {
// Presets measured on real machines (src/sim/presets/*.json), embedded at build time.
struct MeasuredPreset {
    const char* name;
    const char* json;
};
const MeasuredPreset kMeasuredPresets[] = {
#include "hardware_presets.inc"
};
}  // namespace

const std::vector<std::string>& hardware_presets() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> n = {"a100-testbed", "h100-ib"};
        for (const auto& p : kMeasuredPresets) n.push_back(p.name);
        return n;
    }();
    return names;
}

HardwareModel load_hardware(const std::string& name_or_path) {
    if (name_or_path == "a100-testbed") return parse_hardware(kA100Testbed);
    if (name_or_path == "h100-ib") return parse_hardware(kH100Ib);
    for (const auto& p : kMeasuredPresets)
        if (name_or_path == p.name) return parse_hardware(p.json);
    std::string known;
    for (const auto& n : hardware_presets()) known += (known.empty() ? "" : ", ") + n;
    GRACE_CHECK_ARG(std::filesystem::exists(name_or_path), "unknown hardware '", name_or_path, "': not a preset (",
                    known, ") and not a file");
    try {
        HardwareModel hw =
            parse_hardware(read_text(name_or_path), std::filesystem::path(name_or_path).parent_path().string());
        return hw;
    } catch (const Error& e) {
        if (e.code() != ErrorCode::kInvalidInput) throw;
        throw Error(ErrorCode::kInvalidInput, cat(name_or_path, ": ", e.what()));
    }
}

std::string hardware_to_json(const HardwareModel& hw) {
    json j;
    j["format"] = kFormat;
    j["name"] = hw.name;
    j["description"] = hw.description;
    j["element_size"] = hw.element_size;
    j["intra_node"] = {{"bandwidth_GBps", hw.intra_node_bandwidth / 1e9}, {"latency_us", hw.intra_node_latency * 1e6}};
    j["cross_node"] = {{"bandwidth_GBps", hw.cross_node_bandwidth / 1e9}, {"latency_us", hw.cross_node_latency * 1e6}};
    j["compute"] = {{"peak_tflops", hw.peak_flops / 1e12}, {"n_half", hw.n_half}};
    if (!hw.gemm_tables.empty()) {
        json shapes = json::object();
        for (const auto& [model, t] : hw.gemm_tables)
            shapes[model] = {
                {"hidden", t.hidden}, {"intermediate", t.intermediate}, {"tokens", t.tokens}, {"seconds", t.seconds}};
        j["gemm_table"] = {{"device", hw.gemm_device}, {"shapes", shapes}};
    }
    if (hw.non_moe_seconds_per_token >= 0) j["non_moe_seconds_per_token"] = hw.non_moe_seconds_per_token;
    if (hw.hidden > 0) j["hidden"] = hw.hidden;
    if (hw.intermediate > 0) j["intermediate"] = hw.intermediate;
    return j.dump(2) + "\n";
}

ComputeModel::ComputeModel(const HardwareModel& hw, const std::string& model, int hidden, int intermediate) {
    GRACE_CHECK_ARG(hidden > 0 && intermediate > 0, "compute model needs positive hidden and intermediate sizes, got ",
                    hidden, " and ", intermediate);
    auto it = hw.gemm_tables.find(model);
    if (it == hw.gemm_tables.end())
        it = std::find_if(hw.gemm_tables.begin(), hw.gemm_tables.end(), [&](const auto& kv) {
            return kv.second.hidden == hidden && kv.second.intermediate == intermediate;
        });
    if (it != hw.gemm_tables.end()) {
        table_copy_ = it->second;
        table_ = &table_copy_;
        source_ = "table:" + it->first;
    } else {
        source_ = "analytic";
    }
    flops_per_token_ = 6.0 * hidden * static_cast<double>(intermediate);
    peak_ = hw.peak_flops;
    n_half_ = hw.n_half;
    non_moe_ = hw.non_moe_seconds_per_token >= 0 ? hw.non_moe_seconds_per_token
                                                 : 8.0 * hidden * static_cast<double>(hidden) / hw.peak_flops;
}

double ComputeModel::expert_seconds(int64_t n) const {
    if (n <= 0) return 0;
    const double x = static_cast<double>(n);
    if (!table_) return flops_per_token_ * (x + n_half_) / peak_;
    const auto& tk = table_->tokens;
    const auto& sec = table_->seconds;
    if (x <= tk.front()) return sec.front();
    const size_t m = tk.size();
    if (m == 1) return sec[0] * x / tk[0];
    size_t hi = std::upper_bound(tk.begin(), tk.end(), x) - tk.begin();
    if (hi >= m) hi = m - 1;
    const size_t lo = hi - 1;
    const double slope = (sec[hi] - sec[lo]) / (tk[hi] - tk[lo]);
    return std::max(sec[lo] + slope * (x - tk[lo]), 0.0);
}

}  // namespace grace
