#include "grace/model_config.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "grace/eval.hpp"
#include "grace/generator.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

using testing::error_of;
using testing::TempDir;

// Writes `text` as DIR/config.json and reads it back through the file reader.
ModelConfig read_config(const TempDir& dir, const std::string& text) {
    const std::string path = dir.file("config.json");
    std::ofstream(path) << text;
    return load_model_config(path);
}

std::vector<int> range(int first, int end) {
    std::vector<int> v;
    for (int l = first; l < end; ++l) v.push_back(l);
    return v;
}

// Fields as Qwen2-57B-A14B's config.json writes them (attention fields left out), with a sparse step of 2 and a
// dense layer so that the layer rule is exercised: MoE iff l not in mlp_only_layers and (l + 1) % step == 0.
TEST(ModelConfig, ReadsQwen2Moe) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "decoder_sparse_step": 2,
        "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 8, "mlp_only_layers": [3],
        "shared_expert_intermediate_size": 20480, "torch_dtype": "bfloat16", "vocab_size": 151936})");
    EXPECT_EQ(c.name, dir.file("config.json"));
    EXPECT_EQ(c.model_type, "qwen2_moe");
    EXPECT_EQ(c.hidden, 3584);
    EXPECT_EQ(c.intermediate, 2560);  // moe_intermediate_size, not the dense intermediate_size
    EXPECT_EQ(c.num_experts, 64);
    EXPECT_EQ(c.top_k, 8);
    EXPECT_EQ(c.num_hidden_layers, 8);
    EXPECT_EQ(c.moe_layers, (std::vector<int>{1, 5, 7}));
    EXPECT_EQ(c.dtype, "bfloat16");
    EXPECT_EQ(c.dtype_bytes, 2);
}

// Qwen3-MoE: no decoder_sparse_step means every layer; newer transformers write "dtype".
TEST(ModelConfig, ReadsQwen3Moe) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "mlp_only_layers": [],
        "dtype": "float32", "head_dim": 128})");
    EXPECT_EQ(c.hidden, 2048);
    EXPECT_EQ(c.intermediate, 768);
    EXPECT_EQ(c.num_experts, 128);
    EXPECT_EQ(c.top_k, 8);
    EXPECT_EQ(c.moe_layers, range(0, 48));
    EXPECT_EQ(c.dtype_bytes, 4);
}

// DeepSeek-V2(-Lite): routed experts in n_routed_experts; layer 0 dense (first_k_dense_replace 1).
TEST(ModelConfig, ReadsDeepSeekV2) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1, "torch_dtype": "bfloat16"})");
    EXPECT_EQ(c.hidden, 2048);
    EXPECT_EQ(c.intermediate, 1408);
    EXPECT_EQ(c.num_experts, 64);  // shared experts are not routed
    EXPECT_EQ(c.top_k, 6);
    EXPECT_EQ(c.num_moe_layers(), 26);
    EXPECT_EQ(c.moe_layers.front(), 1);
    EXPECT_EQ(c.moe_layers.back(), 26);
}

// DeepSeek-V3 layer rule: l >= first_k_dense_replace and l % moe_layer_freq == 0.
TEST(ModelConfig, ReadsDeepSeekV3LayerRule) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8, "num_hidden_layers": 9,
        "first_k_dense_replace": 3, "moe_layer_freq": 2})");
    EXPECT_EQ(c.intermediate, 2048);
    EXPECT_EQ(c.num_experts, 256);
    EXPECT_EQ(c.moe_layers, (std::vector<int>{4, 6, 8}));
    EXPECT_EQ(c.dtype, "");  // none given
    EXPECT_EQ(c.dtype_bytes, 0);
}

// Mixtral: experts in num_local_experts, expert size in intermediate_size, every layer MoE.
TEST(ModelConfig, ReadsMixtral) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "sliding_window": null, "torch_dtype": "bfloat16"})");
    EXPECT_EQ(c.hidden, 4096);
    EXPECT_EQ(c.intermediate, 14336);
    EXPECT_EQ(c.num_experts, 8);
    EXPECT_EQ(c.top_k, 2);
    EXPECT_EQ(c.moe_layers, range(0, 32));
}

TEST(ModelConfig, ReadsOlmoe) {
    TempDir dir;
    const ModelConfig c = read_config(dir, R"({
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "torch_dtype": "float32", "clip_qkv": null})");
    EXPECT_EQ(c.hidden, 2048);
    EXPECT_EQ(c.intermediate, 1024);
    EXPECT_EQ(c.num_experts, 64);
    EXPECT_EQ(c.top_k, 8);
    EXPECT_EQ(c.num_moe_layers(), 16);
    EXPECT_EQ(c.dtype_bytes, 4);
}

// GPT-OSS checkpoints write top-k twice: experts_per_token (openai) and num_experts_per_tok (transformers).
TEST(ModelConfig, ReadsGptOssTopKFromEitherName) {
    TempDir dir;
    const std::string base = R"("model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "num_local_experts": 32, "num_hidden_layers": 24)";
    ModelConfig c = read_config(dir, "{" + base + R"(, "experts_per_token": 4, "num_experts_per_tok": 4})");
    EXPECT_EQ(c.hidden, 2880);
    EXPECT_EQ(c.intermediate, 2880);
    EXPECT_EQ(c.num_experts, 32);
    EXPECT_EQ(c.top_k, 4);
    EXPECT_EQ(c.num_moe_layers(), 24);
    EXPECT_EQ(read_config(dir, "{" + base + R"(, "experts_per_token": 2})").top_k, 2);
    EXPECT_EQ(read_config(dir, "{" + base + R"(, "num_experts_per_tok": 3})").top_k, 3);
    const std::string e = error_of([&] {
        read_config(dir, "{" + base + R"(, "experts_per_token": 4,
        "num_experts_per_tok": 2})");
    });
    EXPECT_NE(e.find("num_experts_per_tok 2 and experts_per_token 4 disagree"), std::string::npos) << e;
}

TEST(ModelConfig, InfersModelTypeFromArchitectures) {
    const ModelConfig c = parse_model_config(R"({"architectures": ["OlmoeForCausalLM"], "hidden_size": 16,
        "intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2})",
                                             "x.json");
    EXPECT_EQ(c.model_type, "olmoe");
    EXPECT_EQ(c.num_experts, 4);
}

// Every bad input is one line naming the file and the field.
TEST(ModelConfig, RejectsBadFieldsWithOneLineErrors) {
    const std::string ok = R"("model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 4)";
    auto err = [&](const std::string& text) {
        const std::string e = error_of([&] { parse_model_config(text, "cfg/config.json"); });
        EXPECT_EQ(e.find('\n'), std::string::npos) << e;
        EXPECT_EQ(e.rfind("cfg/config.json: ", 0), 0u) << e;
        return e;
    };
    auto has = [](const std::string& e, const std::string& part) {
        EXPECT_NE(e.find(part), std::string::npos) << "'" << e << "' lacks '" << part << "'";
    };
    // Missing fields, named with the architecture that needs them.
    has(err(R"({"model_type": "mixtral", "hidden_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 4})"),
        "missing field \"intermediate_size\" (model_type mixtral)");
    has(err(R"({"model_type": "deepseek_v3", "hidden_size": 64, "moe_intermediate_size": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 4})"),
        "missing field \"n_routed_experts\"");
    has(err(R"({"hidden_size": 64})"), "missing field \"model_type\"");
    has(err("{" + ok.substr(ok.find(',') + 1) + "}"), "missing field \"model_type\"");
    // Unsupported architectures.
    has(err(R"({"model_type": "llama", "hidden_size": 64})"), "model_type 'llama' is not a supported MoE");
    has(err(R"({"architectures": ["LlamaForCausalLM"]})"), "architecture 'LlamaForCausalLM' is not a supported");
    // Non-integers, out-of-range and wrapped values: 64-bit reads, range-checked.
    auto with = [&](const std::string& field, const std::string& value) {
        return "{" + ok + ", \"" + field + "\": " + value + "}";
    };
    auto replaced = [&](const std::string& field, const std::string& value) {
        std::string t = "{" + ok + "}";
        const size_t at = t.find("\"" + field + "\": ") + field.size() + 4;
        t.replace(at, t.find_first_of(",}", at) - at, value);
        return t;
    };
    has(err(replaced("hidden_size", "64.5")), "field \"hidden_size\" must be an integer, got 64.5");
    has(err(replaced("hidden_size", "\"64\"")), "field \"hidden_size\" must be an integer");
    has(err(replaced("hidden_size", "true")), "field \"hidden_size\" must be an integer");
    has(err(replaced("hidden_size", "0")), "field \"hidden_size\" is 0, outside [1, 2147483647]");
    has(err(replaced("num_local_experts", "-8")), "field \"num_local_experts\" is -8, outside");
    has(err(replaced("hidden_size", "4294967360")), "field \"hidden_size\" is 4294967360, outside");
    has(err(replaced("hidden_size", "18446744073709551615")), "above the largest allowed value 2147483647");
    has(err(replaced("hidden_size", "1e30")), "must be an integer");
    // Contradictions.
    has(err(replaced("num_experts_per_tok", "9")), "num_experts_per_tok 9 exceeds the 8 routed experts");
    has(err(replaced("num_experts_per_tok", "0")), "field \"num_experts_per_tok\" is 0, outside");
    const std::string qwen = R"("model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 4)";
    has(err("{" + qwen + R"(, "mlp_only_layers": [4]})"), "field \"mlp_only_layers\" is 4, outside [0, 3]");
    has(err("{" + qwen + R"(, "mlp_only_layers": 1})"), "\"mlp_only_layers\" must be a list");
    has(err("{" + qwen + R"(, "decoder_sparse_step": 0})"), "field \"decoder_sparse_step\" is 0");
    has(err("{" + qwen + R"(, "mlp_only_layers": [0, 1, 2, 3]})"), "none of the 4 layers is an MoE layer");
    const std::string ds = R"("model_type": "deepseek_v2", "hidden_size": 64, "moe_intermediate_size": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 4)";
    has(err("{" + ds + R"(, "first_k_dense_replace": 4})"), "none of the 4 layers is an MoE layer");
    has(err("{" + ds + R"(, "first_k_dense_replace": 5})"), "field \"first_k_dense_replace\" is 5, outside [0, 4]");
    has(err("{" + ds + R"(, "moe_layer_freq": 0})"), "field \"moe_layer_freq\" is 0");
    // Element types.
    has(err(with("torch_dtype", "\"int8\"")), "torch_dtype 'int8' is not one of float32, bfloat16, float16");
    has(err(with("torch_dtype", "2")), "field \"torch_dtype\" must be a string");
    has(err("{" + ok + R"(, "torch_dtype": "bfloat16", "dtype": "float32"})"),
        "torch_dtype 'bfloat16' and dtype 'float32' disagree");
    // Not JSON at all, or not an object.
    has(err("{\"model_type\": "), "not valid JSON");
    has(err("[1, 2]"), "expected a JSON object");
}

TEST(ModelConfig, MissingFileIsAnIoError) {
    TempDir dir;
    try {
        load_model_config(dir.file("absent.json"));
        FAIL() << "no error";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kIo);
    }
}

// ---- the shipped presets --------------------------------------------------------------------------------------

struct ExpectedPreset {
    std::string name;
    int hidden, intermediate, experts, top_k, moe_layers, decoder_layers, first_moe_layer;
    std::string dtype;
};

// The values docs/models.md documents, each read by hand from the source the preset file cites.
const std::vector<ExpectedPreset>& expected_presets() {
    static const std::vector<ExpectedPreset> v = {
        {"deepseek-v2", 5120, 1536, 160, 6, 59, 60, 1, ""},
        {"deepseek-v2-lite", 2048, 1408, 64, 6, 26, 27, 1, ""},
        {"deepseek-v3", 7168, 2048, 256, 8, 58, 61, 3, "bfloat16"},
        {"gpt-oss-120b", 2880, 2880, 128, 4, 36, 36, 0, ""},
        {"gpt-oss-20b", 2880, 2880, 32, 4, 24, 24, 0, ""},
        {"mixtral", 4096, 14336, 8, 2, 32, 32, 0, "bfloat16"},
        {"mixtral-8x22b", 6144, 16384, 8, 2, 56, 56, 0, ""},
        {"olmoe", 2048, 1024, 64, 8, 16, 16, 0, ""},
        {"qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, 24, 24, 0, "bfloat16"},
        {"qwen2-57b-a14b", 3584, 2560, 64, 8, 28, 28, 0, "bfloat16"},
        {"qwen3-235b-a22b", 4096, 1536, 128, 8, 94, 94, 0, "bfloat16"},
        {"qwen3-30b-a3b", 2048, 768, 128, 8, 48, 48, 0, "bfloat16"},
    };
    return v;
}

TEST(ModelPresets, EveryPresetParsesWithItsDocumentedValues) {
    std::vector<std::string> names;
    for (const auto& want : expected_presets()) names.push_back(want.name);
    EXPECT_EQ(model_config_presets(), names);
    for (const auto& want : expected_presets()) {
        SCOPED_TRACE(want.name);
        const ModelConfig& c = model_config_preset(want.name);
        EXPECT_EQ(c.name, want.name);
        EXPECT_EQ(c.hidden, want.hidden);
        EXPECT_EQ(c.intermediate, want.intermediate);
        EXPECT_EQ(c.num_experts, want.experts);
        EXPECT_EQ(c.top_k, want.top_k);
        EXPECT_EQ(c.num_moe_layers(), want.moe_layers);
        EXPECT_EQ(c.num_hidden_layers, want.decoder_layers);
        EXPECT_EQ(c.moe_layers.front(), want.first_moe_layer);
        EXPECT_EQ(c.dtype, want.dtype);
    }
}

TEST(ModelPresets, AliasesAndUnknownNames) {
    EXPECT_EQ(&model_config_preset("deepseek-r1"), &model_config_preset("deepseek-v3"));
    EXPECT_EQ(&model_config_preset("mixtral-8x7b"), &model_config_preset("mixtral"));
    EXPECT_EQ(find_model_config_preset("llama"), nullptr);
    const std::string e = error_of([] { model_config_preset("llama"); });
    EXPECT_NE(e.find("unknown model 'llama' (model presets: deepseek-v2, "), std::string::npos) << e;
    EXPECT_NE(e.find("qwen3-30b-a3b"), std::string::npos) << e;
}

// The trace generator's presets (a different table) describe the same four models with the same shapes.
TEST(ModelPresets, AgreeWithTheGeneratorPresets) {
    for (const ModelPreset& g : model_presets()) {
        SCOPED_TRACE(g.name);
        const ModelConfig& c = model_config_preset(g.name);
        EXPECT_EQ(c.num_experts, g.num_experts);
        EXPECT_EQ(c.top_k, g.top_k);
        EXPECT_EQ(c.num_moe_layers(), g.num_layers);
        EXPECT_EQ(c.hidden, g.hidden);
        EXPECT_EQ(c.intermediate, g.intermediate);
    }
}

// Each preset file cites where its values come from, and docs/models.md has a row with the same values.
TEST(ModelPresets, FilesCiteSourcesAndDocsListTheValues) {
    const std::string root = std::string(GRACE_TEST_DATA_DIR) + "/../..";
    std::ifstream doc_in(root + "/docs/models.md");
    ASSERT_TRUE(doc_in) << "docs/models.md";
    std::stringstream doc;
    doc << doc_in.rdbuf();
    const std::string text = doc.str();
    for (const auto& want : expected_presets()) {
        SCOPED_TRACE(want.name);
        std::ifstream in(root + "/src/sim/presets/models/" + want.name + ".json");
        ASSERT_TRUE(in);
        const nlohmann::json j = nlohmann::json::parse(in);
        ASSERT_TRUE(j["grace"]["sources"].is_array());
        ASSERT_FALSE(j["grace"]["sources"].empty());
        for (const auto& s : j["grace"]["sources"]) {
            for (const char* key : {"repo", "path", "commit", "note"})
                EXPECT_FALSE(s.value(key, std::string()).empty()) << key;
            EXPECT_NE(text.find(s["repo"].get<std::string>()), std::string::npos) << s["repo"];
            EXPECT_NE(text.find(s["path"].get<std::string>()), std::string::npos) << s["path"];
        }
        // | `name` | model | H | I | E | k | MoE layers | decoder layers | first MoE layer | torch_dtype | ...
        const std::string row = cat("| `", want.name, "` | ");
        const size_t at = text.find(row, text.find("## Presets"));
        ASSERT_NE(at, std::string::npos) << "no table row";
        std::string line = text.substr(at, text.find('\n', at) - at);
        std::vector<std::string> cells;
        std::stringstream ss(line);
        for (std::string cell; std::getline(ss, cell, '|');) {
            const size_t b = cell.find_first_not_of(' '), e = cell.find_last_not_of(' ');
            cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
        }
        ASSERT_GE(cells.size(), 11u) << line;
        EXPECT_EQ(cells[3], std::to_string(want.hidden));
        EXPECT_EQ(cells[4], std::to_string(want.intermediate));
        EXPECT_EQ(cells[5], std::to_string(want.experts));
        EXPECT_EQ(cells[6], std::to_string(want.top_k));
        EXPECT_EQ(cells[7], std::to_string(want.moe_layers));
        EXPECT_EQ(cells[8], std::to_string(want.decoder_layers));
        EXPECT_EQ(cells[9], std::to_string(want.first_moe_layer));
        EXPECT_EQ(cells[10], want.dtype.empty() ? "not given" : want.dtype);
    }
}

// ---- shapes for the evaluator -----------------------------------------------------------------------------------

TEST(ModelShapeResolution, EveryPresetNameGivesItsShape) {
    const HardwareModel hw;  // no hidden/intermediate overrides
    const ModelShape s = resolve_model_shape(hw, "deepseek-r1");
    EXPECT_EQ(s.hidden, 7168);
    EXPECT_EQ(s.intermediate, 2048);
    EXPECT_EQ(s.num_experts, 0);  // named by the trace: E and L are not checked
    const std::string e = error_of([&] { resolve_model_shape(hw, "my-model"); });
    EXPECT_NE(e.find("model 'my-model' has no preset ("), std::string::npos) << e;
    EXPECT_NE(e.find("--model-config"), std::string::npos) << e;
}

TEST(ModelShapeResolution, ExplicitShapeIsCheckedAgainstTraceAndOverrides) {
    HardwareModel hw;
    const ModelShape s = explicit_model_shape(hw, model_config_preset("qwen2-57b-a14b"));
    EXPECT_EQ(s.model, "qwen2-57b-a14b");
    EXPECT_EQ(s.hidden, 3584);
    EXPECT_EQ(s.intermediate, 2560);
    EXPECT_EQ(s.num_experts, 64);
    EXPECT_EQ(s.num_layers, 28);
    EXPECT_NO_THROW(check_model_shape(s, 64, 28, "the trace"));
    std::string e = error_of([&] { check_model_shape(s, 32, 28, "the trace"); });
    EXPECT_EQ(e, "model qwen2-57b-a14b has 64 routed experts but the trace has 32");
    e = error_of([&] { check_model_shape(s, 64, 3, "the trace"); });
    EXPECT_EQ(e, "model qwen2-57b-a14b has 28 MoE layers but the trace has 3");
    EXPECT_NO_THROW(check_model_shape(resolve_model_shape(hw, "olmoe"), 16, 3, "the trace"));
    hw.hidden = 2048;
    e = error_of([&] { explicit_model_shape(hw, model_config_preset("qwen2-57b-a14b")); });
    EXPECT_EQ(e, "model qwen2-57b-a14b has hidden size 3584 but the hardware file (or --hidden) gives 2048");
}

}  // namespace
}  // namespace grace
