#include "grace/engine_eval.hpp"

#include <algorithm>

#include "grace/error.hpp"

namespace grace {

namespace {

struct EngineName {
    Engine engine;
    const char* name;
    RoutingPolicy policy;
};
constexpr EngineName kEngines[] = {{Engine::kSglang, "sglang", RoutingPolicy::kSglangStatic},
                                   {Engine::kVllm, "vllm", RoutingPolicy::kVllm},
                                   {Engine::kVllmAscend, "vllm-ascend", RoutingPolicy::kVllmAscend},
                                   {Engine::kTrtllm, "trtllm", RoutingPolicy::kTrtllm}};

}  // namespace

std::string to_string(Engine engine) {
    for (const auto& e : kEngines)
        if (e.engine == engine) return e.name;
    return "?";
}

Engine parse_engine(const std::string& name) {
    for (const auto& e : kEngines)
        if (name == e.name) return e.engine;
    GRACE_CHECK_ARG(false, "unknown engine '", name, "' (expected sglang, vllm, vllm-ascend or trtllm)");
    return Engine::kSglang;
}

RoutingPolicy engine_policy(Engine engine) {
    for (const auto& e : kEngines)
        if (e.engine == engine) return e.policy;
    return RoutingPolicy::kSglangStatic;
}

void check_engine_policy(Engine engine, RoutingPolicy policy) {
    const bool ok = engine == Engine::kSglang
                        ? policy == RoutingPolicy::kSglangStatic || policy == RoutingPolicy::kSglangNearest ||
                              policy == RoutingPolicy::kSglangDynamic
                        : policy == engine_policy(engine);
    GRACE_CHECK_ARG(ok, "engine ", to_string(engine), " does not route with '", to_string(policy), "' (it uses ",
                    engine == Engine::kSglang ? std::string("sglang-static, sglang-nearest or sglang-dynamic")
                                              : to_string(engine_policy(engine)),
                    ")");
}

EngineDeployment deploy_to_engine(const ExpertPlan& plan, RoutingPolicy policy, const std::vector<double>& expert_load,
                                  int slots_per_gpu, int layer_offset) {
    GRACE_CHECK_ARG(is_engine_policy(policy), "'", to_string(policy), "' is not an engine routing policy");
    GRACE_CHECK_ARG(layer_offset >= 0, "layer offset must be >= 0, got ", layer_offset);
    EngineDeployment d;
    d.map = build_physical_map(plan, expert_load, slots_per_gpu);
    const int L = d.map.num_layers, E = d.map.num_experts, G = d.map.num_gpus, S = d.map.slots_per_gpu;
    const size_t P = d.map.num_physical();
    d.plan.num_experts = E;
    d.plan.num_layers = L;
    d.plan.top_k = plan.top_k;
    d.plan.topology = plan.topology;
    // The engine holds exactly S slots per GPU, whatever the plan's own cap was.
    d.plan.topology.slots_per_gpu = S;
    d.plan.method = plan.method;
    d.plan.seed = plan.seed;
    d.plan.source = plan.source;
    for (int l = 0; l < layer_offset; ++l) {
        SlotMap trivial;
        for (size_t p = 0; p < P; ++p) {
            trivial.slot_expert.push_back(static_cast<int>(p % E));
            trivial.slot_gpu.push_back(static_cast<int>(p) / S);
        }
        d.slot_maps.push_back(std::move(trivial));
    }
    for (int l = 0; l < L; ++l) {
        const int* row = d.map.phy2log.data() + l * P;
        SlotMap slots;
        LayerPlan lp;
        lp.layer = l;
        lp.policy = policy;
        lp.wrr_period = plan.layers[l].wrr_period;
        lp.gpu_experts.assign(G, {});
        lp.primary_gpu.assign(E, -1);
        for (size_t p = 0; p < P; ++p) {
            const int e = row[p], g = static_cast<int>(p) / S;
            slots.slot_expert.push_back(e);
            slots.slot_gpu.push_back(g);
            auto& held = lp.gpu_experts[g];
            if (std::find(held.begin(), held.end(), e) == held.end()) held.push_back(e);
            if (lp.primary_gpu[e] < 0) lp.primary_gpu[e] = g;
        }
        lp.finalize(E);
        d.plan.layers.push_back(std::move(lp));
        d.slot_maps.push_back(std::move(slots));
    }
    d.plan.validate();
    return d;
}

}  // namespace grace
