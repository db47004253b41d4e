#include "grace/export.hpp"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/json_read.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/npy.hpp"
#include "grace/replication.hpp"

using json = nlohmann::ordered_json;

namespace grace {

namespace {

struct FormatName {
    ExportFormat format;
    const char* name;
};
constexpr FormatName kFormatNames[] = {{ExportFormat::kSglang, "sglang"},
                                       {ExportFormat::kVllmAscend, "vllm-ascend"},
                                       {ExportFormat::kTrtllm, "trtllm"},
                                       {ExportFormat::kEplb, "eplb"}};

std::vector<int> row(const PhysicalMap& m, int l) {
    const size_t P = m.num_physical();
    return std::vector<int>(m.phy2log.begin() + l * P, m.phy2log.begin() + (l + 1) * P);
}

// log2phy [L][E][X]: each expert's slots in ascending order (EPLB's replica rank carries no meaning for engines).
void eplb_tables(const PhysicalMap& m, std::vector<int>& log2phy, std::vector<int>& logcnt, int& X) {
    const int L = m.num_layers, E = m.num_experts, P = m.num_physical();
    logcnt.assign(static_cast<size_t>(L) * E, 0);
    for (int l = 0; l < L; ++l)
        for (int p = 0; p < P; ++p) ++logcnt[static_cast<size_t>(l) * E + m.phy2log[static_cast<size_t>(l) * P + p]];
    X = 1;
    for (int c : logcnt) X = std::max(X, c);
    log2phy.assign(static_cast<size_t>(L) * E * X, -1);
    std::vector<int> fill(static_cast<size_t>(L) * E, 0);
    for (int l = 0; l < L; ++l)
        for (int p = 0; p < P; ++p) {
            const size_t le = static_cast<size_t>(l) * E + m.phy2log[static_cast<size_t>(l) * P + p];
            log2phy[le * X + fill[le]++] = p;
        }
}

std::vector<std::vector<int>> split_gpus(const std::vector<int>& slots, int num_gpus, const std::string& what) {
    GRACE_CHECK_INPUT(num_gpus >= 1 && slots.size() % num_gpus == 0, what, ": ", slots.size(),
                      " physical slots do not split evenly over ", num_gpus, " GPUs");
    const size_t S = slots.size() / num_gpus;
    std::vector<std::vector<int>> out(num_gpus);
    for (int g = 0; g < num_gpus; ++g) out[g].assign(slots.begin() + g * S, slots.begin() + (g + 1) * S);
    return out;
}

void check_layer_offset(int offset) {
    GRACE_CHECK_ARG(offset >= 0 && offset <= kMaxLayerOffset, "export: layer offset ", offset, " is outside [0, ",
                    kMaxLayerOffset, "] (it is the model layer index of MoE layer 0)");
}

// A whole int in `text` (TensorRT-LLM's YAML keys and slots); anything else, overflow included, is an error.
int parse_int(const std::string& text, const std::string& what, const std::string& line) {
    size_t used = 0;
    long long v = 0;
    try {
        v = std::stoll(text, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    while (used < text.size() && text[used] == ' ') ++used;
    GRACE_CHECK_INPUT(
        used == text.size() && v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), what,
        ": '", text, "' is not a 32-bit integer in line '", line, "'");
    return static_cast<int>(v);
}

}  // namespace

std::string to_string(ExportFormat format) {
    for (const auto& f : kFormatNames)
        if (f.format == format) return f.name;
    return "?";
}

ExportFormat parse_export_format(const std::string& name) {
    for (const auto& f : kFormatNames)
        if (name == f.name) return f.format;
    GRACE_CHECK_ARG(false, "unknown export format '", name, "' (expected sglang, vllm-ascend, trtllm or eplb)");
    return ExportFormat::kSglang;
}

PhysicalMap build_physical_map(const ExpertPlan& plan, const std::vector<double>& expert_load, int slots_per_gpu) {
    plan.validate();
    const int L = plan.num_layers, E = plan.num_experts, G = plan.topology.num_gpus();
    GRACE_CHECK_ARG(expert_load.empty() || expert_load.size() == static_cast<size_t>(L) * E,
                    "export: expert loads have ", expert_load.size(),
                    " entries, expected L*E = ", static_cast<size_t>(L) * E);
    PhysicalMap m;
    m.num_layers = L;
    m.num_experts = E;
    m.num_gpus = G;
    for (const auto& lp : plan.layers)
        for (const auto& ex : lp.gpu_experts) m.slots_per_gpu = std::max<int>(m.slots_per_gpu, ex.size());
    if (slots_per_gpu > 0) {
        GRACE_CHECK_ARG(slots_per_gpu <= E, "export: ", slots_per_gpu, " slots per GPU exceed the ", E,
                        " experts (a GPU would hold an expert twice)");
        for (const auto& lp : plan.layers)
            for (int g = 0; g < G; ++g)
                GRACE_CHECK_ARG(static_cast<int>(lp.gpu_experts[g].size()) <= slots_per_gpu, "export: layer ", lp.layer,
                                " puts ", lp.gpu_experts[g].size(), " instances on GPU ", g, ", more than the ",
                                slots_per_gpu, " slots per GPU asked for");
        m.slots_per_gpu = slots_per_gpu;
    }
    const size_t P = m.num_physical();
    m.phy2log.assign(static_cast<size_t>(L) * P, -1);
    for (int l = 0; l < L; ++l) {
        LayerPlan lp = plan.layers[l];
        std::vector<double> load(E, 1.0);
        if (!expert_load.empty()) {
            load.assign(expert_load.begin() + static_cast<size_t>(l) * E,
                        expert_load.begin() + static_cast<size_t>(l + 1) * E);
        } else if (static_cast<int>(lp.predicted_gpu_load.size()) == G) {
            for (int e = 0; e < E; ++e) {
                const int g = lp.primary_gpu[e];
                load[e] = std::max(0.0, lp.predicted_gpu_load[g]) / std::max<size_t>(1, lp.gpu_experts[g].size());
            }
        }
        m.num_padded += pad_to_equal_slots(lp, load, E, plan.topology, m.slots_per_gpu);
        for (int g = 0; g < G; ++g) {
            GRACE_ASSERT(static_cast<int>(lp.gpu_experts[g].size()) == m.slots_per_gpu);
            std::copy(lp.gpu_experts[g].begin(), lp.gpu_experts[g].end(),
                      m.phy2log.begin() + l * P + static_cast<size_t>(g) * m.slots_per_gpu);
        }
    }
    return m;
}

std::string export_text(const PhysicalMap& m, const ExportOptions& options) {
    const int L = m.num_layers, E = m.num_experts, G = m.num_gpus, P = m.num_physical(), S = m.slots_per_gpu;
    check_layer_offset(options.layer_offset);
    switch (options.format) {
        case ExportFormat::kSglang: {
            json rows = json::array();
            for (int l = 0; l < options.layer_offset; ++l) {
                std::vector<int> trivial(P);
                for (int p = 0; p < P; ++p) trivial[p] = p % E;
                rows.push_back(trivial);
            }
            for (int l = 0; l < L; ++l) rows.push_back(row(m, l));
            json j;
            j["physical_to_logical_map"] = std::move(rows);
            return j.dump() + "\n";
        }
        case ExportFormat::kVllmAscend: {
            json j;
            j["moe_layer_count"] = L;
            json layers = json::array();
            for (int l = 0; l < L; ++l) {
                const std::vector<int> r = row(m, l);
                json devices = json::array();
                for (int g = 0; g < G; ++g)
                    devices.push_back(
                        {{"device_id", g},
                         {"device_expert", std::vector<int>(r.begin() + g * S, r.begin() + (g + 1) * S)}});
                layers.push_back({{"layer_id", l}, {"device_count", G}, {"device_list", std::move(devices)}});
            }
            j["layer_list"] = std::move(layers);
            return j.dump(1) + "\n";
        }
        case ExportFormat::kTrtllm: {
            std::ostringstream os;
            os << "initial_global_assignments:\n";
            for (int l = 0; l < L; ++l) {
                os << "  " << l + options.layer_offset << ": [";
                const std::vector<int> r = row(m, l);
                for (int p = 0; p < P; ++p) os << (p ? ", " : "") << r[p];
                os << "]\n";
            }
            os << "num_slots: " << P << "\n";
            os << "layer_updates_per_iter: 0\n";
            return os.str();
        }
        case ExportFormat::kEplb: {
            std::vector<int> log2phy, logcnt;
            int X = 0;
            eplb_tables(m, log2phy, logcnt, X);
            json p2l = json::array(), l2p = json::array(), cnt = json::array();
            for (int l = 0; l < L; ++l) {
                p2l.push_back(row(m, l));
                json layer = json::array();
                for (int e = 0; e < E; ++e) {
                    const auto b = log2phy.begin() + (static_cast<size_t>(l) * E + e) * X;
                    layer.push_back(std::vector<int>(b, b + X));
                }
                l2p.push_back(std::move(layer));
                cnt.push_back(std::vector<int>(logcnt.begin() + static_cast<size_t>(l) * E,
                                               logcnt.begin() + static_cast<size_t>(l + 1) * E));
            }
            json j;
            j["phy2log"] = std::move(p2l);
            j["log2phy"] = std::move(l2p);
            j["logcnt"] = std::move(cnt);
            return j.dump() + "\n";
        }
    }
    return {};
}

PhysicalMap export_plan(const ExpertPlan& plan, const ExportOptions& options, const std::string& path) {
    check_layer_offset(options.layer_offset);
    PhysicalMap m = build_physical_map(plan, options.expert_load);
    const bool npy_dir =
        options.format == ExportFormat::kEplb && !(path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0);
    if (!npy_dir) {
        check_output_dir(path);
        write_text_atomic(path, export_text(m, options));
        return m;
    }
    check_output_folder(path, "eplb-export");
    std::vector<int> log2phy, logcnt;
    int X = 0;
    eplb_tables(m, log2phy, logcnt, X);
    const int64_t L = m.num_layers, E = m.num_experts, P = m.num_physical();
    write_dir_atomic(path, "eplb-export", [&](const std::string& tmp) {
        write_npy(tmp + "/phy2log.npy", std::vector<int64_t>(m.phy2log.begin(), m.phy2log.end()), {L, P});
        write_npy(tmp + "/log2phy.npy", std::vector<int64_t>(log2phy.begin(), log2phy.end()), {L, E, X});
        write_npy(tmp + "/logcnt.npy", std::vector<int64_t>(logcnt.begin(), logcnt.end()), {L, E});
    });
    return m;
}

std::vector<std::vector<std::vector<int>>> read_export(const std::string& path, ExportFormat format, int num_gpus,
                                                       int layer_offset) {
    check_layer_offset(layer_offset);
    std::vector<std::vector<std::vector<int>>> out;
    const std::string what = "export " + path;
    if (format == ExportFormat::kEplb && std::filesystem::is_directory(path)) {
        std::vector<int64_t> shape;
        const std::vector<int64_t> p2l = read_npy_int(path + "/phy2log.npy", &shape);
        GRACE_CHECK_INPUT(shape.size() == 2, what, ": phy2log.npy must be 2-D");
        for (int64_t l = 0; l < shape[0]; ++l)
            out.push_back(split_gpus(std::vector<int>(p2l.begin() + l * shape[1], p2l.begin() + (l + 1) * shape[1]),
                                     num_gpus, what));
        return out;
    }
    const std::string text = read_text(path);
    if (format == ExportFormat::kTrtllm) {
        std::istringstream is(text);
        std::string line;
        bool in_map = false;
        int expect = layer_offset;
        while (std::getline(is, line)) {
            if (line.rfind("initial_global_assignments:", 0) == 0) {
                in_map = true;
                continue;
            }
            if (line.empty() || line[0] != ' ') {
                in_map = false;
                continue;
            }
            if (!in_map) continue;
            const size_t colon = line.find(':'), lb = line.find('['), rb = line.find(']');
            GRACE_CHECK_INPUT(colon != std::string::npos && lb != std::string::npos && rb != std::string::npos, what,
                              ": bad assignment line '", line, "'");
            GRACE_CHECK_INPUT(parse_int(line.substr(0, colon), what, line) == expect, what, ": expected layer ",
                              expect);
            ++expect;
            std::vector<int> slots;
            const std::string body = line.substr(lb + 1, rb - lb - 1);
            for (size_t b = 0; b < body.size();) {
                size_t e = body.find(',', b);
                if (e == std::string::npos) e = body.size();
                std::string item = body.substr(b, e - b);
                while (!item.empty() && item.front() == ' ') item.erase(item.begin());
                if (!item.empty() || e < body.size()) slots.push_back(parse_int(item, what, line));
                b = e + 1;
            }
            out.push_back(split_gpus(slots, num_gpus, what));
        }
        return out;
    }
    json j;
    try {
        j = json::parse(text);
        // Integers through detail::json_int (64-bit, range-checked, errors name the field): nothing wraps.
        constexpr int kLo = std::numeric_limits<int>::min(), kHi = std::numeric_limits<int>::max();
        if (format == ExportFormat::kSglang) {
            const auto rows = detail::json_int_matrix(detail::json_member(j, what, "", "physical_to_logical_map"), what,
                                                      "physical_to_logical_map", kLo, kHi);
            GRACE_CHECK_INPUT(static_cast<int64_t>(rows.size()) >= layer_offset, what,
                              ": fewer rows than the layer offset");
            for (size_t l = layer_offset; l < rows.size(); ++l) out.push_back(split_gpus(rows[l], num_gpus, what));
        } else if (format == ExportFormat::kVllmAscend) {
            const json& layers = detail::json_member(j, what, "", "layer_list");
            GRACE_CHECK_INPUT(layers.is_array(), what, ": layer_list must be an array");
            for (size_t l = 0; l < layers.size(); ++l) {
                const std::string at = cat("layer_list[", l, "]");
                const json& devices = detail::json_member(layers[l], what, at, "device_list");
                GRACE_CHECK_INPUT(devices.is_array(), what, ": ", at, ".device_list must be an array");
                std::vector<std::vector<int>> gpus;
                for (size_t d = 0; d < devices.size(); ++d) {
                    const std::string dat = cat(at, ".device_list[", d, "]");
                    gpus.push_back(detail::json_int_vector(detail::json_member(devices[d], what, dat, "device_expert"),
                                                           what, dat + ".device_expert", kLo, kHi));
                }
                GRACE_CHECK_INPUT(static_cast<int64_t>(gpus.size()) ==
                                      detail::json_int_member<int64_t>(layers[l], what, at, "device_count", 0, kHi),
                                  what, ": device_count disagrees with device_list");
                out.push_back(std::move(gpus));
            }
            GRACE_CHECK_INPUT(static_cast<int64_t>(out.size()) ==
                                  detail::json_int_member<int64_t>(j, what, "", "moe_layer_count", 0, kHi),
                              what, ": moe_layer_count disagrees with layer_list");
        } else {
            const auto rows =
                detail::json_int_matrix(detail::json_member(j, what, "", "phy2log"), what, "phy2log", kLo, kHi);
            for (const auto& r : rows) out.push_back(split_gpus(r, num_gpus, what));
        }
    } catch (const json::exception& e) {
        GRACE_CHECK_INPUT(false, what, ": ", e.what());
    }
    return out;
}

}  // namespace grace
