// Host side of the GPU router: the CPU router's pick sequences (spec §5) flattened into the table the kernel reads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "grace/cuda_moe.hpp"
#include "grace/error.hpp"
#include "grace/plan.hpp"
#include "grace/routing.hpp"
#include "grace/topology.hpp"

namespace grace::cuda {

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
        GRACE_CHECK_ARG(instance_gpu[i] >= 0 && instance_gpu[i] < num_sources, "RouteTable: instance ", i, " on GPU ",
                        instance_gpu[i], " outside [0, ", num_sources, ")");
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
    t.sequence.assign(static_cast<size_t>(G) * E * Q, 0);  // primary: instance 0 everywhere
    if (policy != RoutingPolicy::kPrimary) {
        const std::vector<uint8_t> seq = ReplicaRouter(layer, topology, policy).flat_sequences();
        GRACE_ASSERT(seq.size() == t.sequence.size());
        std::copy(seq.begin(), seq.end(), t.sequence.begin());
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
