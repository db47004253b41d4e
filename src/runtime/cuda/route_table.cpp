// Host side of the GPU router: the smooth-WRR sequences (spec §5) flattened into the table the kernel reads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "grace/cuda_moe.hpp"
#include "grace/error.hpp"
#include "grace/plan.hpp"
#include "grace/topology.hpp"

namespace grace::cuda {

std::vector<int32_t> smooth_wrr(const std::vector<int>& weights) {
    GRACE_CHECK_ARG(!weights.empty(), "smooth_wrr: empty weight list");
    int64_t total = 0;
    for (size_t j = 0; j < weights.size(); ++j) {
        GRACE_CHECK_ARG(weights[j] >= 1, "smooth_wrr: weight ", j, " is ", weights[j], " (must be >= 1)");
        total += weights[j];
    }
    std::vector<int64_t> current(weights.size(), 0);
    std::vector<int32_t> picks(static_cast<size_t>(total));
    for (int64_t step = 0; step < total; ++step) {
        size_t best = 0;
        for (size_t j = 0; j < weights.size(); ++j) {
            current[j] += weights[j];
            if (current[j] > current[best]) best = j;  // strict: ties keep the lowest index
        }
        current[best] -= total;
        picks[static_cast<size_t>(step)] = static_cast<int32_t>(best);
    }
    return picks;
}

std::vector<int> round_to_period(const std::vector<double>& weights, int period) {
    const int n = static_cast<int>(weights.size());
    GRACE_CHECK_ARG(n >= 1, "round_to_period: empty weight list");
    GRACE_CHECK_ARG(period >= n, "round_to_period: period ", period, " < ", n, " weights");
    double sum = 0;
    for (double w : weights) {
        GRACE_CHECK_ARG(w > 0 && std::isfinite(w), "round_to_period: weight ", w, " is not positive");
        sum += w;
    }
    // Same arithmetic, in the same order, as the CPU router's round_weights (src/core/routing.cpp), so that
    // both sides floor the same doubles.
    std::vector<double> exact(n);
    std::vector<int> out(n);
    int assigned = 0;
    for (int i = 0; i < n; ++i) {
        exact[i] = weights[i] / sum * period;
        out[i] = std::max(1, static_cast<int>(std::floor(exact[i])));
        assigned += out[i];
    }
    while (assigned < period) {  // largest remainder, ties to the lower index
        int best = 0;
        double best_gap = -1e300;
        for (int i = 0; i < n; ++i)
            if (exact[i] - out[i] > best_gap) best_gap = exact[i] - out[i], best = i;
        ++out[best];
        ++assigned;
    }
    while (assigned > period) {  // only after the >= 1 floor overshot: take from the most over-allocated
        int best = -1;
        double best_gap = -1e300;
        for (int i = 0; i < n; ++i)
            if (out[i] > 1 && out[i] - exact[i] > best_gap) best_gap = out[i] - exact[i], best = i;
        GRACE_ASSERT(best >= 0);
        --out[best];
        --assigned;
    }
    return out;
}

void RouteTable::validate() const {
    GRACE_CHECK_ARG(num_sources >= 1 && num_experts >= 1 && period >= 1, "RouteTable: bad sizes G=", num_sources,
                    " E=", num_experts, " Q=", period);
    GRACE_CHECK_ARG(instance_ptr.size() == static_cast<size_t>(num_experts) + 1 && instance_ptr[0] == 0,
                    "RouteTable: instance_ptr has ", instance_ptr.size(), " entries, expected E+1=", num_experts + 1);
    for (int e = 0; e < num_experts; ++e)
        GRACE_CHECK_ARG(instance_ptr[e + 1] > instance_ptr[e], "RouteTable: expert ", e, " has no instance");
    GRACE_CHECK_ARG(instance_gpu.size() == static_cast<size_t>(instance_ptr[num_experts]),
                    "RouteTable: instance_gpu has ", instance_gpu.size(), " entries, instance_ptr says ",
                    instance_ptr[num_experts]);
    for (size_t i = 0; i < instance_gpu.size(); ++i)
        GRACE_CHECK_ARG(instance_gpu[i] >= 0 && instance_gpu[i] < num_sources, "RouteTable: instance ", i,
                        " on GPU ", instance_gpu[i], " outside [0, ", num_sources, ")");
    GRACE_CHECK_ARG(sequence.size() == static_cast<size_t>(num_sources) * num_experts * period,
                    "RouteTable: sequence has ", sequence.size(), " entries, expected G*E*Q");
    for (int se = 0; se < num_sources * num_experts; ++se) {
        const int e = se % num_experts;
        const int n = instance_ptr[e + 1] - instance_ptr[e];
        for (int q = 0; q < period; ++q) {
            const int32_t v = sequence[static_cast<size_t>(se) * period + q];
            GRACE_CHECK_ARG(v >= 0 && v < n, "RouteTable: sequence of (source ", se / num_experts, ", expert ", e,
                            ") position ", q, " is ", v, ", expert has ", n, " instances");
        }
    }
}

RouteTable build_route_table(const LayerPlan& layer, const Topology& topology, RoutingPolicy policy) {
    GRACE_CHECK(policy == RoutingPolicy::kPrimary || policy == RoutingPolicy::kWrr || policy == RoutingPolicy::kTar,
                ErrorCode::kUnsupported, "GPU router: routing policy #", static_cast<int>(policy),
                " is not table-driven (primary, wrr, tar are)");
    const int E = static_cast<int>(layer.instance_gpus.size());
    const int G = topology.num_gpus();
    const int Q = layer.wrr_period;
    GRACE_CHECK_ARG(E >= 1, "GPU router: layer ", layer.layer, " has no instance_gpus (call finalize first)");
    GRACE_CHECK_ARG(Q >= 1, "GPU router: wrr_period ", Q);
    RouteTable t;
    t.num_sources = G;
    t.num_experts = E;
    t.period = Q;
    t.instance_ptr.assign(1, 0);
    for (int e = 0; e < E; ++e) {
        for (int g : layer.instance_gpus[e]) t.instance_gpu.push_back(g);
        t.instance_ptr.push_back(static_cast<int32_t>(t.instance_gpu.size()));
    }
    t.sequence.assign(static_cast<size_t>(G) * E * Q, 0);
    for (int e = 0; e < E; ++e) {
        const auto& gpus = layer.instance_gpus[e];
        const int n = static_cast<int>(gpus.size());
        GRACE_CHECK_ARG(n >= 1, "GPU router: expert ", e, " has no instance");
        std::vector<int> w = e < static_cast<int>(layer.wrr_weights.size()) ? layer.wrr_weights[e] : std::vector<int>{};
        if (w.empty()) w = round_to_period(std::vector<double>(n, 1.0), Q);
        GRACE_CHECK_ARG(static_cast<int>(w.size()) == n, "GPU router: expert ", e, " has ", w.size(),
                        " weights for ", n, " instances");
        for (int s = 0; s < G; ++s) {
            int32_t* row = &t.sequence[(static_cast<size_t>(s) * E + e) * Q];
            if (policy == RoutingPolicy::kPrimary) continue;  // instance 0 everywhere
            std::vector<int> tier;  // instance indices eligible from s
            if (policy == RoutingPolicy::kTar) {
                for (int i = 0; i < n; ++i)
                    if (gpus[i] == s) tier.push_back(i);
                if (tier.empty())
                    for (int i = 0; i < n; ++i)
                        if (topology.node_of(gpus[i]) == topology.node_of(s)) tier.push_back(i);
            }
            if (tier.empty()) {
                tier.resize(n);
                std::iota(tier.begin(), tier.end(), 0);
            }
            if (tier.size() == 1) {
                std::fill(row, row + Q, tier[0]);
                continue;
            }
            std::vector<int> tier_weights = w;  // WRR: the plan's weights as they are
            if (policy == RoutingPolicy::kTar) {
                std::vector<double> tw;
                for (int i : tier) tw.push_back(w[i]);
                tier_weights = round_to_period(tw, Q);
            }
            const std::vector<int32_t> picks = smooth_wrr(tier_weights);
            GRACE_CHECK_ARG(static_cast<int>(picks.size()) == Q, "GPU router: WRR weights of expert ", e, " sum to ",
                            picks.size(), ", not the period ", Q);
            for (int q = 0; q < Q; ++q) row[q] = tier[picks[q]];
        }
    }
    return t;
}

uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace grace::cuda
