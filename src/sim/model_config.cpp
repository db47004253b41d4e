// Hugging Face config.json reader and the shipped model presets (docs/models.md).
#include "grace/model_config.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "grace/error.hpp"
#include "grace/io.hpp"

namespace grace {
namespace {

using nlohmann::json;

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// Where one model_type keeps the fields that differ between architectures.
struct Family {
    const char* model_type;
    const char* architecture;  // architectures[0] of its checkpoints
    const char* intermediate;  // expert intermediate size
    const char* experts;       // routed experts
    enum class Layers { kAll, kQwen, kDeepSeek } layers;
};

constexpr Family kFamilies[] = {
    {"qwen2_moe", "Qwen2MoeForCausalLM", "moe_intermediate_size", "num_experts", Family::Layers::kQwen},
    {"qwen3_moe", "Qwen3MoeForCausalLM", "moe_intermediate_size", "num_experts", Family::Layers::kQwen},
    {"deepseek_v2", "DeepseekV2ForCausalLM", "moe_intermediate_size", "n_routed_experts", Family::Layers::kDeepSeek},
    {"deepseek_v3", "DeepseekV3ForCausalLM", "moe_intermediate_size", "n_routed_experts", Family::Layers::kDeepSeek},
    {"mixtral", "MixtralForCausalLM", "intermediate_size", "num_local_experts", Family::Layers::kAll},
    {"olmoe", "OlmoeForCausalLM", "intermediate_size", "num_experts", Family::Layers::kAll},
    {"gpt_oss", "GptOssForCausalLM", "intermediate_size", "num_local_experts", Family::Layers::kAll},
};

std::string supported_types() {
    std::string s;
    for (const Family& f : kFamilies) s += (s.empty() ? "" : ", ") + std::string(f.model_type);
    return s;
}

// One integer field, read as 64 bits and range-checked before it is narrowed: a JSON float, bool or string is an
// error, not a silent conversion.
class Reader {
  public:
    Reader(const json& j, const std::string& origin) : j_(j), origin_(origin) {}

    std::optional<int64_t> optional_int(const char* key, int64_t lo, int64_t hi) const {
        if (!j_.contains(key) || j_[key].is_null()) return std::nullopt;
        return to_int(j_[key], key, lo, hi);
    }

    int required_int(const char* key, int64_t lo, int64_t hi, const std::string& why) const {
        GRACE_CHECK_INPUT(j_.contains(key) && !j_[key].is_null(), origin_, ": missing field \"", key, "\"", why);
        return static_cast<int>(to_int(j_[key], key, lo, hi));
    }

    int64_t to_int(const json& v, const std::string& key, int64_t lo, int64_t hi) const {
        GRACE_CHECK_INPUT(v.is_number_integer(), origin_, ": field \"", key, "\" must be an integer, got ", v.dump());
        // Above INT64_MAX only an unsigned read is exact; everything else is compared as int64.
        GRACE_CHECK_INPUT(
            !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())),
            origin_, ": field \"", key, "\" is ", v.dump(), ", above the largest allowed value ", hi);
        const int64_t x = v.get<int64_t>();
        GRACE_CHECK_INPUT(x >= lo && x <= hi, origin_, ": field \"", key, "\" is ", x, ", outside [", lo, ", ", hi,
                          "]");
        return x;
    }

    const std::string& origin() const { return origin_; }

  private:
    const json& j_;
    const std::string& origin_;
};

int dtype_size(const std::string& dtype) {
    static const std::map<std::string, int> kSizes = {
        {"float32", 4}, {"float", 4}, {"bfloat16", 2}, {"float16", 2}, {"half", 2}};
    auto it = kSizes.find(dtype);
    return it == kSizes.end() ? 0 : it->second;
}

ModelConfig parse_json(const json& j, const std::string& origin) {
    GRACE_CHECK_INPUT(j.is_object(), origin, ": expected a JSON object");
    ModelConfig c;
    c.name = origin;

    // The architecture: model_type, else architectures[0].
    const Family* family = nullptr;
    if (j.contains("model_type")) {
        GRACE_CHECK_INPUT(j["model_type"].is_string(), origin, ": field \"model_type\" must be a string");
        c.model_type = j["model_type"].get<std::string>();
        for (const Family& f : kFamilies)
            if (c.model_type == f.model_type) family = &f;
        GRACE_CHECK_INPUT(family, origin, ": model_type '", c.model_type, "' is not a supported MoE architecture (",
                          supported_types(), ")");
    } else {
        GRACE_CHECK_INPUT(j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
                              j["architectures"][0].is_string(),
                          origin, ": missing field \"model_type\" (and no \"architectures\" to infer it from)");
        const std::string arch = j["architectures"][0].get<std::string>();
        for (const Family& f : kFamilies)
            if (arch == f.architecture) family = &f;
        GRACE_CHECK_INPUT(family, origin, ": missing field \"model_type\", and architecture '", arch,
                          "' is not a supported MoE architecture (", supported_types(), ")");
        c.model_type = family->model_type;
    }
    const std::string why = cat(" (model_type ", c.model_type, ")");
    const Reader r(j, origin);

    c.hidden = r.required_int("hidden_size", 1, kMaxInt, why);
    c.intermediate = r.required_int(family->intermediate, 1, kMaxInt, why);
    c.num_experts = r.required_int(family->experts, 1, kMaxInt, why);
    c.num_hidden_layers = r.required_int("num_hidden_layers", 1, kMaxInt, why);

    // Top-k; GPT-OSS checkpoints carry it twice (openai's name and transformers').
    const auto k = r.optional_int("num_experts_per_tok", 1, kMaxInt);
    if (c.model_type == "gpt_oss") {
        const auto k2 = r.optional_int("experts_per_token", 1, kMaxInt);
        GRACE_CHECK_INPUT(k || k2, origin, ": missing field \"num_experts_per_tok\" (or \"experts_per_token\")", why);
        GRACE_CHECK_INPUT(!(k && k2 && *k != *k2), origin, ": num_experts_per_tok ", k.value_or(0),
                          " and experts_per_token ", k2.value_or(0), " disagree");
        c.top_k = static_cast<int>(k ? *k : *k2);
    } else {
        GRACE_CHECK_INPUT(k, origin, ": missing field \"num_experts_per_tok\"", why);
        c.top_k = static_cast<int>(*k);
    }
    GRACE_CHECK_INPUT(c.top_k <= c.num_experts, origin, ": num_experts_per_tok ", c.top_k, " exceeds the ",
                      c.num_experts, " routed experts (", family->experts, ")");

    // Which decoder layers are MoE layers.
    const int n = c.num_hidden_layers;
    switch (family->layers) {
        case Family::Layers::kAll:
            for (int l = 0; l < n; ++l) c.moe_layers.push_back(l);
            break;
        case Family::Layers::kQwen: {
            const int step = static_cast<int>(r.optional_int("decoder_sparse_step", 1, kMaxInt).value_or(1));
            std::vector<bool> dense(n, false);
            if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
                GRACE_CHECK_INPUT(j["mlp_only_layers"].is_array(), origin,
                                  ": field \"mlp_only_layers\" must be a list of layer indices");
                for (const json& v : j["mlp_only_layers"]) dense[r.to_int(v, "mlp_only_layers", 0, n - 1)] = true;
            }
            for (int l = 0; l < n; ++l)
                if (!dense[l] && (l + 1) % step == 0) c.moe_layers.push_back(l);
            break;
        }
        case Family::Layers::kDeepSeek: {
            const int first = static_cast<int>(r.optional_int("first_k_dense_replace", 0, n).value_or(0));
            const int freq = static_cast<int>(r.optional_int("moe_layer_freq", 1, kMaxInt).value_or(1));
            for (int l = first; l < n; ++l)
                if (l % freq == 0) c.moe_layers.push_back(l);
            break;
        }
    }
    GRACE_CHECK_INPUT(!c.moe_layers.empty(), origin, ": none of the ", n,
                      " layers is an MoE layer (check first_k_dense_replace, moe_layer_freq, decoder_sparse_step, "
                      "mlp_only_layers)");

    // Element size; transformers >= 4.56 writes "dtype" instead of "torch_dtype".
    for (const char* key : {"torch_dtype", "dtype"}) {
        if (!j.contains(key) || j[key].is_null()) continue;
        GRACE_CHECK_INPUT(j[key].is_string(), origin, ": field \"", key, "\" must be a string, got ", j[key].dump());
        const std::string d = j[key].get<std::string>();
        GRACE_CHECK_INPUT(dtype_size(d) > 0, origin, ": ", key, " '", d, "' is not one of float32, bfloat16, float16");
        GRACE_CHECK_INPUT(c.dtype.empty() || c.dtype == d, origin, ": torch_dtype '", c.dtype, "' and dtype '", d,
                          "' disagree");
        c.dtype = d;
        c.dtype_bytes = dtype_size(d);
    }
    return c;
}

json parse_text(const std::string& text, const std::string& origin) {
    try {
        return json::parse(text);
    } catch (const json::exception& e) {
        throw Error(ErrorCode::kInvalidInput, cat(origin, ": not valid JSON (", e.what(), ")"));
    }
}

// The presets: src/sim/presets/models/*.json, embedded by CMake. Each is the Hugging Face fields the reader needs
// plus a "grace" block with the preset's name, aliases and the source of its values.
struct EmbeddedModel {
    const char* file;
    const char* json;
};
constexpr EmbeddedModel kEmbedded[] = {
#include "model_presets.inc"
};

struct PresetTable {
    std::vector<ModelConfig> configs;
    std::map<std::string, size_t> index;  // names and aliases
    std::vector<std::string> names;
};

const PresetTable& presets() {
    static const PresetTable table = [] {
        PresetTable t;
        for (const EmbeddedModel& m : kEmbedded) {
            const std::string origin = cat("model preset ", m.file);
            const json j = parse_text(m.json, origin);
            GRACE_ASSERT(j.contains("grace") && j["grace"].contains("name"));
            ModelConfig c = parse_json(j, origin);
            c.name = j["grace"]["name"].get<std::string>();
            GRACE_ASSERT(c.name == m.file);
            t.index.emplace(c.name, t.configs.size());
            for (const json& a : j["grace"].value("aliases", json::array()))
                t.index.emplace(a.get<std::string>(), t.configs.size());
            t.names.push_back(c.name);
            t.configs.push_back(std::move(c));
        }
        std::sort(t.names.begin(), t.names.end());
        return t;
    }();
    return table;
}

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& origin) {
    return parse_json(parse_text(json_text, origin), origin);
}

ModelConfig load_model_config(const std::string& path) { return parse_model_config(read_text(path), path); }

const std::vector<std::string>& model_config_presets() { return presets().names; }

const ModelConfig* find_model_config_preset(const std::string& name) {
    const PresetTable& t = presets();
    auto it = t.index.find(name);
    return it == t.index.end() ? nullptr : &t.configs[it->second];
}

const ModelConfig& model_config_preset(const std::string& name) {
    const ModelConfig* c = find_model_config_preset(name);
    if (c) return *c;
    std::string known;
    for (const auto& n : model_config_presets()) known += (known.empty() ? "" : ", ") + n;
    throw Error(ErrorCode::kInvalidArgument, cat("unknown model '", name, "' (model presets: ", known, ")"));
}

}  // namespace grace
