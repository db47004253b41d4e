#include "grace/migration.hpp"

#include <algorithm>

#include "grace/error.hpp"

namespace grace {

void check_switchable(const ExpertPlan& a, const ExpertPlan& b) {
    GRACE_CHECK_INPUT(a.num_experts == b.num_experts, "--switch-plan has ", b.num_experts, " experts but --plan has ",
                      a.num_experts);
    GRACE_CHECK_INPUT(a.num_layers == b.num_layers, "--switch-plan has ", b.num_layers, " layers but --plan has ",
                      a.num_layers);
    GRACE_CHECK_INPUT(a.top_k == b.top_k, "--switch-plan has top_k = ", b.top_k, " but --plan has top_k = ", a.top_k);
    GRACE_CHECK_INPUT(a.topology.nodes == b.topology.nodes && a.topology.gpus_per_node == b.topology.gpus_per_node,
                      "--switch-plan is for topology ", b.topology.to_string(), " but --plan is for ",
                      a.topology.to_string());
}

MigrationCost migration_cost(const ExpertPlan& plan1, const ExpertPlan& plan2, double bytes_per_expert,
                             const HardwareModel& hw) {
    check_switchable(plan1, plan2);
    GRACE_CHECK_ARG(bytes_per_expert > 0, "bytes per expert must be > 0, got ", bytes_per_expert);
    const Topology& topo = plan1.topology;
    const int G = topo.num_gpus(), N = topo.nodes, E = plan1.num_experts;
    MigrationCost c;
    c.bytes_per_expert = bytes_per_expert;
    c.experts_received.assign(G, 0);
    c.bytes_received.assign(G, 0);
    c.intra_node_bytes_in.assign(G, 0);
    c.cross_node_bytes_in.assign(G, 0);
    std::vector<double> nvl_out(G, 0), nic_in(N, 0), nic_out(N, 0);
    for (int l = 0; l < plan1.num_layers; ++l) {
        // holds[g * E + e]: PLAN1 has an instance of e on g.
        std::vector<char> holds(static_cast<size_t>(G) * E, 0);
        for (int g = 0; g < G; ++g)
            for (int e : plan1.layers[l].gpu_experts[g]) holds[static_cast<size_t>(g) * E + e] = 1;
        for (int g = 0; g < G; ++g)
            for (int e : plan2.layers[l].gpu_experts[g]) {
                if (holds[static_cast<size_t>(g) * E + e]) continue;
                int src = -1;
                for (int s = 0; s < G && src < 0; ++s)
                    if (holds[static_cast<size_t>(s) * E + e] && topo.node_of(s) == topo.node_of(g)) src = s;
                const bool cross = src < 0;
                for (int s = 0; s < G && src < 0; ++s)
                    if (holds[static_cast<size_t>(s) * E + e]) src = s;
                GRACE_CHECK_INPUT(src >= 0, "layer ", l, ": expert ", e, " has no instance in --plan to copy from");
                ++c.experts_received[g];
                c.bytes_received[g] += bytes_per_expert;
                if (cross) {
                    c.cross_node_bytes_in[g] += bytes_per_expert;
                    nic_in[topo.node_of(g)] += bytes_per_expert;
                    nic_out[topo.node_of(src)] += bytes_per_expert;
                } else {
                    c.intra_node_bytes_in[g] += bytes_per_expert;
                    nvl_out[src] += bytes_per_expert;
                }
            }
    }
    for (int g = 0; g < G; ++g) {
        c.total_experts += c.experts_received[g];
        c.total_bytes += c.bytes_received[g];
        c.intra_node_time_s =
            std::max(c.intra_node_time_s, std::max(c.intra_node_bytes_in[g], nvl_out[g]) / hw.intra_node_bandwidth);
    }
    for (int n = 0; n < N; ++n)
        c.cross_node_time_s = std::max(c.cross_node_time_s, std::max(nic_in[n], nic_out[n]) / hw.cross_node_bandwidth);
    c.time_s = std::max(c.intra_node_time_s, c.cross_node_time_s);
    return c;
}

}  // namespace grace
