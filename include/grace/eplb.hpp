#pragma once
/// @file eplb.hpp
/// DeepSeek's Expert Parallelism Load Balancer, implemented from its published algorithm (spec §8).
///
/// Hierarchical policy (num_groups % num_nodes == 0): pack expert groups onto nodes by greedy balanced
/// packing, replicate experts inside each node by water-filling on load per replica, then pack the physical
/// experts onto the node's GPUs; global policy otherwise: the same with one group and one node.
/// Names follow EPLB: phy2log, log2phy, logcnt, num_replicas (physical experts).

#include <cstdint>
#include <vector>

namespace grace {

/// EPLB's output for L layers.
struct EplbResult {
    int num_layers = 0;
    int num_logical = 0;       ///< E
    int num_physical = 0;      ///< P = num_replicas
    int max_replicas = 0;      ///< X: width of log2phy
    std::vector<int> phy2log;  ///< [L, P]: logical expert of each physical slot (slots contiguous per GPU)
    std::vector<int> log2phy;  ///< [L, E, X]: physical slots of each logical expert, -1 padded
    std::vector<int> logcnt;   ///< [L, E]: replica count of each logical expert
};

/// Greedy balanced packing: assigns n items with `weights` to `num_packs` packs of n/num_packs items each,
/// heaviest first, each to the lightest pack that still has room. Returns (pack, rank within pack) per item.
void balanced_packing(const std::vector<double>& weights, int num_packs, std::vector<int>& pack_index,
                      std::vector<int>& rank_in_pack);

/// Water-filling replication: gives `num_physical` >= n slots to n logical experts, each extra slot to the
/// expert with the highest load per replica. Returns phy2log [num_physical], rank [num_physical], logcnt [n].
void replicate_experts(const std::vector<double>& weights, int num_physical, std::vector<int>& phy2log,
                       std::vector<int>& rank, std::vector<int>& logcnt);

/// `weight` is [L, E] (row-major). Throws kInvalidArgument unless num_replicas % num_gpus == 0,
/// num_gpus % num_nodes == 0 and num_replicas >= E. Hierarchical policy iff num_groups % num_nodes == 0.
EplbResult rebalance_experts(const std::vector<double>& weight, int num_layers, int num_experts, int num_replicas,
                             int num_groups, int num_nodes, int num_gpus);

}  // namespace grace
