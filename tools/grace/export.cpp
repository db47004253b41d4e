// `grace export`: plan -> the placement file a serving engine loads (SGLang, vLLM-Ascend, TensorRT-LLM, EPLB).
#include "grace/export.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <optional>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/model_config.hpp"
#include "grace/stats.hpp"

namespace grace::cli {
namespace {

// Model types whose SGLang model class has get_model_config_for_expert_location (read in sgl-project/sglang:
// deepseek_v2.py, qwen2_moe.py, qwen3_moe.py, gpt_oss.py; docs/deploy.md). Without it SGLang sizes the expert
// location from a dummy 1-layer, 1-expert config, which no GRACE map fits.
bool sglang_has_expert_location(const std::string& model_type) {
    for (const char* t : {"deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "gpt_oss"})
        if (model_type == t) return true;
    return false;
}

// Checks the plan and its export against the model's config.json; throws (nothing written yet) on a mismatch.
// Returns the layer offset to export with.
int check_against_model(const ModelConfig& model, const ExpertPlan& plan, ExportFormat format, bool offset_given,
                        int layer_offset) {
    GRACE_CHECK_INPUT(model.num_experts == plan.num_experts, "model config ", model.name, " has ", model.num_experts,
                      " experts but the plan has E=", plan.num_experts);
    GRACE_CHECK_INPUT(model.num_moe_layers() == plan.num_layers, "model config ", model.name, " has ",
                      model.num_moe_layers(), " MoE layers but the plan has L=", plan.num_layers);
    const int first = model.moe_layers.front();
    GRACE_CHECK_ARG(!offset_given || layer_offset == first, "--layer-offset ", layer_offset, " but model config ",
                    model.name, " has its first MoE layer at decoder layer ", first);
    // SGLang rows and TensorRT-LLM keys put MoE layer l at decoder layer offset + l; vLLM-Ascend and EPLB count
    // MoE layers only.
    if (format == ExportFormat::kSglang || format == ExportFormat::kTrtllm)
        for (int l = 0; l < model.num_moe_layers(); ++l)
            GRACE_CHECK_INPUT(model.moe_layers[l] == first + l, "model config ", model.name, ": MoE layer ", l,
                              " is decoder layer ", model.moe_layers[l], ", not ", first + l, "; the ",
                              to_string(format), " export needs consecutive MoE layers");
    if (format == ExportFormat::kSglang) {
        GRACE_CHECK_INPUT(first + plan.num_layers == model.num_hidden_layers, "model config ", model.name, " has ",
                          model.num_hidden_layers, " decoder layers but the SGLang map would have ",
                          first + plan.num_layers, " rows (dense layers after the last MoE layer)");
        GRACE_CHECK_INPUT(model.model_type != "olmoe", "SGLang's OLMoE model (", model.name,
                          ") has no get_model_config_for_expert_location, so SGLang cannot take its placement from "
                          "--init-expert-location; serve OLMoE with another engine");
    }
    return first;
}

// The launch flags matching the export just written (docs/deploy.md, "Start the engine").
void print_launch_flags(const ModelConfig& model, ExportFormat format, const PhysicalMap& m, int layer_offset,
                        const std::string& out) {
    const int R = m.num_physical() - m.num_experts;
    std::printf(
        "model %s: %d decoder layers, MoE layers %d-%d (layer offset %d), E=%d, %d GPUs x %d slots: "
        "%d redundant experts\n",
        model.name.c_str(), model.num_hidden_layers, model.moe_layers.front(), model.moe_layers.back(), layer_offset,
        m.num_experts, m.num_gpus, m.slots_per_gpu, R);
    switch (format) {
        case ExportFormat::kSglang:
            std::printf(
                "launch flags (SGLang): --ep-size %d --init-expert-location %s --ep-num-redundant-experts %d "
                "--ep-dispatch-algorithm static\n",
                m.num_gpus, out.c_str(), R);
            std::printf("leave out --enable-eplb (a switch: given, SGLang rebalances away from this placement)\n");
            if (!sglang_has_expert_location(model.model_type))
                std::printf("note: SGLang's expert-location support for model_type %s was not checked by GRACE\n",
                            model.model_type.c_str());
            break;
        case ExportFormat::kVllmAscend:
            std::printf(
                "launch flags (vLLM-Ascend): --enable-expert-parallel --additional-config "
                "'{\"eplb_config\": {\"expert_map_path\": \"%s\", \"num_redundant_experts\": %d, "
                "\"dynamic_eplb\": false}}'\n",
                out.c_str(), R);
            break;
        case ExportFormat::kTrtllm:
            std::printf(
                "launch flags (TensorRT-LLM): --ep_size %d, and in the extra options YAML moe_config: "
                "{load_balancer: %s} (num_slots %d, layer keys from %d)\n",
                m.num_gpus, out.c_str(), m.num_physical(), layer_offset);
            break;
        case ExportFormat::kEplb:
            std::printf(
                "launch flags (vLLM, then the start-up patch of docs/deploy.md): --enable-expert-parallel "
                "--enable-eplb --eplb-config '{\"num_redundant_experts\": %d}'; MoE layer 0 is decoder "
                "layer %d\n",
                R, layer_offset);
            break;
    }
}

std::function<int()> setup_export(CLI::App& sub) {
    struct Args {
        std::string plan, format, out, stats, model_config;
        int layer_offset = 0;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("plan", a->plan, "Plan JSON (grace plan)")->required();
    sub.add_option("--format", a->format, "sglang | vllm-ascend | trtllm | eplb")
        ->required()
        ->check(parsed_by([](const std::string& f) { parse_export_format(f); }, "FORMAT"));
    sub.add_option("-o,--output", a->out,
                   "Output file (eplb: .json, or otherwise a folder of phy2log/log2phy/logcnt .npy: new, empty, or "
                   "an earlier grace eplb export)")
        ->required();
    sub.add_option("--stats", a->stats, "Statistics folder whose loads choose the padding replicas (optional)");
    CLI::Option* offset_opt =
        sub.add_option("--layer-offset", a->layer_offset,
                       "Model layer index of MoE layer 0 (TensorRT-LLM keys, SGLang leading trivial rows)")
            ->capture_default_str()
            ->check(integer_in<int>(0));
    sub.add_option("--model-config", a->model_config,
                   "Hugging Face config.json of the served model: checks its experts, MoE layers (and the layer "
                   "offset) against the plan before writing, and prints the engine's launch flags");
    return [a, offset_opt] {
        ExportOptions opt;
        opt.format = parse_export_format(a->format);
        opt.layer_offset = a->layer_offset;
        const ExpertPlan plan = load_plan(a->plan);
        std::optional<ModelConfig> model;
        if (!a->model_config.empty()) {
            model = load_model_config(a->model_config);
            opt.layer_offset = check_against_model(*model, plan, opt.format, offset_opt->count() > 0, a->layer_offset);
        }
        if (!a->stats.empty()) {
            const RoutingStats st = load_stats(a->stats);
            GRACE_CHECK_ARG(st.num_experts == plan.num_experts && st.num_layers == plan.num_layers, "statistics ",
                            a->stats, " have E=", st.num_experts, " L=", st.num_layers,
                            " but the plan has E=", plan.num_experts, " L=", plan.num_layers);
            opt.expert_load.assign(st.load.begin(), st.load.end());
        }
        const PhysicalMap m = export_plan(plan, opt, a->out);
        std::printf("exported %s as %s: L=%d, %d GPUs x %d slots = %d physical experts, %d padding replicas -> %s\n",
                    a->plan.c_str(), to_string(opt.format).c_str(), m.num_layers, m.num_gpus, m.slots_per_gpu,
                    m.num_physical(), m.num_padded, a->out.c_str());
        if (m.num_padded > 0) {
            size_t lo = SIZE_MAX, hi = 0;
            for (const auto& lp : plan.layers)
                for (const auto& ex : lp.gpu_experts) lo = std::min(lo, ex.size()), hi = std::max(hi, ex.size());
            std::printf("note: the plan holds %zu to %zu instances per GPU and engines need the same count on every "
                        "GPU, so %d slots hold padding replicas that no planning step chose (the most loaded expert "
                        "each GPU lacks); plan with --slots-per-gpu S (e.g. %d = ceil(E/G) + 1) or --redundant-experts R for a slot-exact "
                        "plan that pads nothing\n",
                        lo, hi, m.num_padded, (plan.num_experts + m.num_gpus - 1) / m.num_gpus + 1);
        }
        if (model) print_launch_flags(*model, opt.format, m, opt.layer_offset, a->out);
        return 0;
    };
}

GRACE_COMMAND("export", "Export a plan to SGLang, vLLM-Ascend, TensorRT-LLM or EPLB placement files", setup_export, 35);

}  // namespace
}  // namespace grace::cli
