#include "grace/plan.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/json_read.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/routing.hpp"

using json = nlohmann::ordered_json;

namespace grace {

namespace {

const char* kFormat = "grace.plan/v1";

constexpr int kMaxId = std::numeric_limits<int32_t>::max();  // counts and ids are int32 in memory
constexpr int kMaxWrrPeriod = 65535;                         // ReplicaRouter's sequences hold one period

struct PolicyName {
    RoutingPolicy policy;
    const char* name;
};
constexpr PolicyName kPolicyNames[] = {{RoutingPolicy::kPrimary, "primary"},
                                       {RoutingPolicy::kWrr, "wrr"},
                                       {RoutingPolicy::kTar, "tar"},
                                       {RoutingPolicy::kVllm, "vllm"},
                                       {RoutingPolicy::kSglangStatic, "sglang-static"},
                                       {RoutingPolicy::kSglangDynamic, "sglang-dynamic"},
                                       {RoutingPolicy::kSglangNearest, "sglang-nearest"},
                                       {RoutingPolicy::kVllmAscend, "vllm-ascend"},
                                       {RoutingPolicy::kTrtllm, "trtllm"}};

json number_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

}  // namespace

std::string to_string(RoutingPolicy policy) {
    for (const auto& p : kPolicyNames)
        if (p.policy == policy) return p.name;
    return "?";
}

RoutingPolicy parse_routing_policy(const std::string& name) {
    for (const auto& p : kPolicyNames)
        if (name == p.name) return p.policy;
    GRACE_CHECK_ARG(
        false, "unknown routing policy '", name,
        "' (expected primary, wrr, tar, vllm, sglang-static, sglang-dynamic, sglang-nearest, vllm-ascend or "
        "trtllm)");
    return RoutingPolicy::kPrimary;
}

int LayerPlan::num_instances() const {
    int n = 0;
    for (const auto& g : gpu_experts) n += static_cast<int>(g.size());
    return n;
}

void LayerPlan::finalize(int num_experts) {
    for (auto& g : gpu_experts) std::sort(g.begin(), g.end());
    std::vector<std::vector<int>> inst(num_experts);
    for (int e = 0; e < num_experts; ++e)
        if (e < static_cast<int>(primary_gpu.size())) inst[e].push_back(primary_gpu[e]);
    for (int g = 0; g < static_cast<int>(gpu_experts.size()); ++g)
        for (int e : gpu_experts[g])
            if (e >= 0 && e < num_experts && (e >= static_cast<int>(primary_gpu.size()) || primary_gpu[e] != g))
                inst[e].push_back(g);
    bool same = inst == instance_gpus;
    instance_gpus = std::move(inst);
    if (!same || wrr_weights.size() != instance_gpus.size()) {
        wrr_weights.assign(num_experts, {});
    }
    for (int e = 0; e < num_experts; ++e) {
        if (wrr_weights[e].size() != instance_gpus[e].size() && !instance_gpus[e].empty())
            wrr_weights[e] = round_weights(std::vector<double>(instance_gpus[e].size(), 1.0), wrr_period);
    }
}

void ExpertPlan::validate() const {
    GRACE_CHECK_INPUT(num_experts >= 1 && num_layers >= 1 && top_k >= 1,
                      "plan: num_experts, num_layers and top_k must ", "be positive (got ", num_experts, ", ",
                      num_layers, ", ", top_k, ")");
    GRACE_CHECK_INPUT(top_k <= num_experts, "plan: top_k ", top_k, " exceeds num_experts ", num_experts);
    try {
        topology.validate();
    } catch (const Error& e) {
        throw Error(ErrorCode::kInvalidInput, cat("plan: ", e.what()));
    }
    const int G = topology.num_gpus();
    GRACE_CHECK_INPUT(static_cast<int>(layers.size()) == num_layers, "plan: has ", layers.size(),
                      " layers but num_layers is ", num_layers);
    for (int l = 0; l < num_layers; ++l) {
        const LayerPlan& lp = layers[l];
        GRACE_CHECK_INPUT(lp.layer == l, "plan: layer entry ", l, " is labelled ", lp.layer);
        GRACE_CHECK_INPUT(static_cast<int>(lp.gpu_experts.size()) == G, "plan layer ", l, ": gpu_experts has ",
                          lp.gpu_experts.size(), " GPUs but the topology ", topology.to_string(), " has ", G);
        // Sizes first, so that a huge num_experts fails here instead of sizing the tables below.
        GRACE_CHECK_INPUT(lp.primary_gpu.size() == static_cast<size_t>(num_experts), "plan layer ", l,
                          ": primary_gpu has ", lp.primary_gpu.size(), " entries, expected ", num_experts);
        std::vector<int> count(num_experts, 0);
        for (int g = 0; g < G; ++g) {
            const auto& ex = lp.gpu_experts[g];
            if (topology.slots_per_gpu)
                GRACE_CHECK_INPUT(static_cast<int>(ex.size()) <= *topology.slots_per_gpu, "plan layer ", l, ": GPU ", g,
                                  " holds ", ex.size(), " instances but has only ", *topology.slots_per_gpu, " slots");
            for (size_t i = 0; i < ex.size(); ++i) {
                GRACE_CHECK_INPUT(ex[i] >= 0 && ex[i] < num_experts, "plan layer ", l, ": GPU ", g, " holds expert ",
                                  ex[i], ", outside [0, ", num_experts, ")");
                GRACE_CHECK_INPUT(i == 0 || ex[i] != ex[i - 1], "plan layer ", l, ": GPU ", g,
                                  " holds two instances of expert ", ex[i]);
                GRACE_CHECK_INPUT(i == 0 || ex[i] > ex[i - 1], "plan layer ", l, ": GPU ", g,
                                  " lists its experts out of ascending order");
                ++count[ex[i]];
            }
        }
        for (int e = 0; e < num_experts; ++e) {
            GRACE_CHECK_INPUT(count[e] >= 1, "plan layer ", l, ": expert ", e, " has no instance");
            int p = lp.primary_gpu[e];
            GRACE_CHECK_INPUT(p >= 0 && p < G, "plan layer ", l, ": primary GPU ", p, " of expert ", e,
                              " is outside [0, ", G, ")");
            GRACE_CHECK_INPUT(std::binary_search(lp.gpu_experts[p].begin(), lp.gpu_experts[p].end(), e), "plan layer ",
                              l, ": expert ", e, "'s primary GPU ", p, " does not hold it");
            GRACE_CHECK_INPUT(count[e] <= 255, "plan layer ", l, ": expert ", e, " has more than 255 instances");
        }
        GRACE_CHECK_INPUT(lp.wrr_period >= 1 && lp.wrr_period <= kMaxWrrPeriod, "plan layer ", l, ": WRR period ",
                          lp.wrr_period, " is outside [1, ", kMaxWrrPeriod, "]");
        GRACE_CHECK_INPUT(static_cast<int>(lp.instance_gpus.size()) == num_experts &&
                              static_cast<int>(lp.wrr_weights.size()) == num_experts,
                          "plan layer ", l, ": routing tables must list every expert");
        for (int e = 0; e < num_experts; ++e) {
            const auto& inst = lp.instance_gpus[e];
            GRACE_CHECK_INPUT(
                static_cast<int>(inst.size()) == count[e] && !inst.empty() && inst[0] == lp.primary_gpu[e],
                "plan layer ", l, ": routing instances of expert ", e, " do not match gpu_experts (primary first)");
            for (int g : inst)
                GRACE_CHECK_INPUT(
                    g >= 0 && g < G && std::binary_search(lp.gpu_experts[g].begin(), lp.gpu_experts[g].end(), e),
                    "plan layer ", l, ": routing lists GPU ", g, " for expert ", e, ", which does not hold it");
            const auto& w = lp.wrr_weights[e];
            GRACE_CHECK_INPUT(w.size() == inst.size(), "plan layer ", l, ": expert ", e, " has ", inst.size(),
                              " instances but ", w.size(), " WRR weights");
            int64_t sum = 0;  // 64-bit: weights near 2^31 must not wrap into a sum that matches the period
            for (int x : w) {
                GRACE_CHECK_INPUT(x >= 1, "plan layer ", l, ": WRR weight ", x, " of expert ", e,
                                  " must be at least 1");
                sum += x;
            }
            GRACE_CHECK_INPUT(sum == lp.wrr_period, "plan layer ", l, ": WRR weights of expert ", e, " sum to ", sum,
                              ", not the period ", lp.wrr_period);
        }
    }
}

std::string plan_to_json(const ExpertPlan& plan) {
    json j;
    j["format"] = kFormat;
    j["num_experts"] = plan.num_experts;
    j["num_layers"] = plan.num_layers;
    j["top_k"] = plan.top_k;
    j["topology"] = {
        {"nodes", plan.topology.nodes},
        {"gpus_per_node", plan.topology.gpus_per_node},
        {"slots_per_gpu", plan.topology.slots_per_gpu ? json(*plan.topology.slots_per_gpu) : json(nullptr)}};
    j["method"] = plan.method;
    j["seed"] = plan.seed;
    j["source"] = plan.source;
    json layers = json::array();
    for (const auto& lp : plan.layers) {
        json jl;
        jl["layer"] = lp.layer;
        jl["gpu_experts"] = lp.gpu_experts;
        jl["primary_gpu"] = lp.primary_gpu;
        jl["routing"] = {{"policy", to_string(lp.policy)},
                         {"period", lp.wrr_period},
                         {"instances", lp.instance_gpus},
                         {"weights", lp.wrr_weights}};
        json curves = json::array();
        for (const auto& curve : lp.knee_curves) {
            json c = json::array();
            for (const auto& p : curve) c.push_back({{"r", p.r}, {"u", p.u}, {"d", p.d}});
            curves.push_back(c);
        }
        jl["grouping"] = {{"r_star", number_or_null(lp.r_star)}, {"knee_curves", curves}};
        jl["replication"] = {
            {"gamma", number_or_null(lp.gamma)},
            {"num_replicas", lp.num_replicas},
            {"hot_experts", lp.hot_experts},
            {"fill_replicas", lp.num_fill_replicas},
            {"priced_moves", lp.num_priced_moves}};
        jl["gpu_load_before"] = lp.gpu_load_before;
        jl["predicted_gpu_load"] = lp.predicted_gpu_load;
        layers.push_back(std::move(jl));
    }
    j["layers"] = std::move(layers);
    return j.dump(1) + "\n";
}

ExpertPlan plan_from_json(const std::string& text) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception& e) {
        GRACE_CHECK_INPUT(false, "plan: not valid JSON (", e.what(), ")");
    }
    ExpertPlan plan;
    std::string field;
    const std::string what = "plan";
    try {
        GRACE_CHECK_INPUT(j.is_object(), "plan: expected a JSON object");
        field = "format";
        GRACE_CHECK_INPUT(j.at("format").get<std::string>() == kFormat, "plan: format is '",
                          j.at("format").get<std::string>(), "', expected '", kFormat, "'");
        // Integers are range-checked as they are read (detail::json_int), so nothing wraps on the way in;
        // validate() then checks the plan's structure.
        plan.num_experts = detail::json_int_member(j, what, "", "num_experts", 1, kMaxId);
        plan.num_layers = detail::json_int_member(j, what, "", "num_layers", 1, kMaxId);
        plan.top_k = detail::json_int_member(j, what, "", "top_k", 1, plan.num_experts);
        const json& t = detail::json_member(j, what, "", "topology");
        plan.topology.nodes = detail::json_int_member(t, what, "topology", "nodes", 1, kMaxGpus);
        plan.topology.gpus_per_node = detail::json_int_member(t, what, "topology", "gpus_per_node", 1, kMaxGpus);
        try {
            plan.topology.validate();
        } catch (const Error& e) {
            throw Error(ErrorCode::kInvalidInput, cat("plan: ", e.what()));
        }
        const int E = plan.num_experts, G = plan.topology.num_gpus();
        if (t.contains("slots_per_gpu") && !t.at("slots_per_gpu").is_null())
            plan.topology.slots_per_gpu =
                detail::json_int(t.at("slots_per_gpu"), what, "topology.slots_per_gpu", 1, kMaxId);
        field = "method";
        plan.method = j.value("method", "");
        if (j.contains("seed"))
            plan.seed = detail::json_int<uint64_t>(j.at("seed"), what, "seed", 0, std::numeric_limits<uint64_t>::max());
        field = "source";
        plan.source = j.value("source", "");
        const json& layers = detail::json_member(j, what, "", "layers");
        GRACE_CHECK_INPUT(layers.is_array(), "plan: layers must be an array");
        for (size_t i = 0; i < layers.size(); ++i) {
            const json& jl = layers[i];
            const std::string at = cat("layers[", i, "]");
            LayerPlan lp;
            lp.layer = detail::json_int_member(jl, what, at, "layer", 0, kMaxId);
            lp.gpu_experts = detail::json_int_matrix(detail::json_member(jl, what, at, "gpu_experts"), what,
                                                     at + ".gpu_experts", 0, E - 1);
            lp.primary_gpu = detail::json_int_vector(detail::json_member(jl, what, at, "primary_gpu"), what,
                                                     at + ".primary_gpu", 0, G - 1);
            field = at + ".routing";
            if (jl.contains("routing")) {
                const json& r = jl.at("routing");
                const std::string rat = at + ".routing";
                lp.policy = parse_routing_policy(r.value("policy", "primary"));
                lp.wrr_period = r.contains("period")
                                    ? detail::json_int(r.at("period"), what, rat + ".period", 1, kMaxWrrPeriod)
                                    : 120;
                if (r.contains("instances"))
                    lp.instance_gpus = detail::json_int_matrix(r.at("instances"), what, rat + ".instances", 0, G - 1);
                if (r.contains("weights"))
                    lp.wrr_weights = detail::json_int_matrix(r.at("weights"), what, rat + ".weights", 1, kMaxWrrPeriod);
            }
            field = at + " diagnostics";
            if (jl.contains("grouping")) {
                const json& g = jl.at("grouping");
                if (g.contains("r_star") && !g.at("r_star").is_null()) lp.r_star = g.at("r_star").get<double>();
                if (g.contains("knee_curves"))
                    for (const json& c : g.at("knee_curves")) {
                        std::vector<KneePoint> curve;
                        for (const json& p : c)
                            curve.push_back(
                                {p.at("r").get<double>(), p.at("u").get<double>(), p.at("d").get<double>()});
                        lp.knee_curves.push_back(std::move(curve));
                    }
            }
            if (jl.contains("replication")) {
                const json& r = jl.at("replication");
                const std::string rat = at + ".replication";
                if (r.contains("gamma") && !r.at("gamma").is_null()) lp.gamma = r.at("gamma").get<double>();
                if (r.contains("num_replicas"))
                    lp.num_replicas = detail::json_int(r.at("num_replicas"), what, rat + ".num_replicas", 0, kMaxId);
                if (r.contains("hot_experts"))
                    lp.hot_experts = detail::json_int_vector(r.at("hot_experts"), what, rat + ".hot_experts", 0, E - 1);
                if (r.contains("fill_replicas"))
                    lp.num_fill_replicas =
                        detail::json_int(r.at("fill_replicas"), what, rat + ".fill_replicas", 0, kMaxId);
                if (r.contains("priced_moves"))
                    lp.num_priced_moves = detail::json_int(r.at("priced_moves"), what, rat + ".priced_moves", 0, kMaxId);
            }
            if (jl.contains("gpu_load_before"))
                lp.gpu_load_before = jl.at("gpu_load_before").get<std::vector<double>>();
            if (jl.contains("predicted_gpu_load"))
                lp.predicted_gpu_load = jl.at("predicted_gpu_load").get<std::vector<double>>();
            // A plan written by another tool may omit the routing tables: derive them. finalize() sizes its
            // tables by E, so first check that the layer lists every expert (a bad plan fails in validate()).
            if (lp.instance_gpus.empty() && static_cast<int>(lp.primary_gpu.size()) == E) lp.finalize(E);
            plan.layers.push_back(std::move(lp));
        }
    } catch (const json::exception& e) {
        GRACE_CHECK_INPUT(false, "plan: missing or malformed field '", field, "' (", e.what(), ")");
    }
    plan.validate();
    return plan;
}

void save_plan(const ExpertPlan& plan, const std::string& path) {
    plan.validate();
    write_text_atomic(path, plan_to_json(plan));
}

ExpertPlan load_plan(const std::string& path) {
    try {
        return plan_from_json(read_text(path));
    } catch (const Error& e) {
        if (e.code() == ErrorCode::kInvalidInput) throw Error(e.code(), cat(path, ": ", e.what()));
        throw;
    }
}

uint64_t plan_hash(const ExpertPlan& plan) {
    uint64_t h = 1469598103934665603ULL;
    for (unsigned char c : plan_to_json(plan)) {
        h ^= c;
        h *= 1099511628211ULL;
    }
    return h;
}

}  // namespace grace
