// `grace export`: plan -> the placement file a serving engine loads (SGLang, vLLM-Ascend, TensorRT-LLM, EPLB).
#include "grace/export.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/stats.hpp"

namespace grace::cli {
namespace {

std::function<int()> setup_export(CLI::App& sub) {
    struct Args {
        std::string plan, format, out, stats;
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
    sub.add_option("--layer-offset", a->layer_offset,
                   "Model layer index of MoE layer 0 (TensorRT-LLM keys, SGLang leading trivial rows)")
        ->capture_default_str()
        ->check(integer_in<int>(0));
    return [a] {
        ExportOptions opt;
        opt.format = parse_export_format(a->format);
        opt.layer_offset = a->layer_offset;
        const ExpertPlan plan = load_plan(a->plan);
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
        return 0;
    };
}

GRACE_COMMAND("export", "Export a plan to SGLang, vLLM-Ascend, TensorRT-LLM or EPLB placement files", setup_export, 35);

}  // namespace
}  // namespace grace::cli
