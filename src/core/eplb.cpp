/// @file eplb.cpp
/// DeepSeek's EPLB (spec §8), written from its published algorithm description. Per layer, the hierarchical
/// policy (1) packs expert groups onto nodes, (2) replicates experts inside each node by water-filling on load
/// per replica, (3) packs each node's physical experts onto its GPUs, then maps everything back to logical ids.
/// The global policy is the hierarchical one with a single group and a single node.

#include "grace/eplb.hpp"

#include <algorithm>
#include <numeric>

#include "grace/error.hpp"

namespace grace {
namespace {

/// Items sorted by descending weight; equal weights keep ascending index (what a stable descending sort
/// gives, and what reproduces EPLB's published outputs where replicas of one expert tie).
void sort_descending(const double* w, int n, std::vector<int>& order) {
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [w](int a, int b) { return w[a] > w[b]; });
}

/// balanced_packing on a raw row; scratch vectors are reused across rows.
void pack_row(const double* w, int n, int num_packs, int* pack_index, int* rank_in_pack, std::vector<int>& order,
              std::vector<double>& pack_weight, std::vector<int>& pack_items) {
    const int per_pack = n / num_packs;
    if (per_pack == 1) {  // EPLB's shortcut: item i goes to pack i, whatever the weights
        for (int i = 0; i < n; ++i) {
            pack_index[i] = i;
            rank_in_pack[i] = 0;
        }
        return;
    }
    sort_descending(w, n, order);
    pack_weight.assign(num_packs, 0.0);
    pack_items.assign(num_packs, 0);
    for (int item : order) {
        int best = -1;
        for (int p = 0; p < num_packs; ++p) {
            if (pack_items[p] < per_pack && (best < 0 || pack_weight[p] < pack_weight[best])) best = p;
        }
        GRACE_ASSERT(best >= 0);
        pack_index[item] = best;
        rank_in_pack[item] = pack_items[best];
        pack_weight[best] += w[item];
        ++pack_items[best];
    }
}

/// replicate_experts on a raw row: `num_log` experts, `num_phy` slots.
void replicate_row(const double* w, int num_log, int num_phy, int* phy2log, int* rank, int* logcnt) {
    for (int i = 0; i < num_log; ++i) {
        phy2log[i] = i;
        rank[i] = 0;
        logcnt[i] = 1;
    }
    for (int p = num_log; p < num_phy; ++p) {
        int best = 0;  // highest load per replica, ties to the lower index
        for (int i = 1; i < num_log; ++i) {
            if (w[i] / logcnt[i] > w[best] / logcnt[best]) best = i;
        }
        phy2log[p] = best;
        rank[p] = logcnt[best];
        ++logcnt[best];
    }
}

}  // namespace

void balanced_packing(const std::vector<double>& weights, int num_packs, std::vector<int>& pack_index,
                      std::vector<int>& rank_in_pack) {
    const int n = static_cast<int>(weights.size());
    GRACE_CHECK_ARG(num_packs >= 1, "balanced_packing: num_packs must be >= 1, got ", num_packs);
    GRACE_CHECK_ARG(n % num_packs == 0, "balanced_packing: ", n, " items do not split evenly into ", num_packs,
                    " packs");
    pack_index.assign(n, -1);
    rank_in_pack.assign(n, -1);
    if (n == 0) return;
    std::vector<int> order, items;
    std::vector<double> pw;
    pack_row(weights.data(), n, num_packs, pack_index.data(), rank_in_pack.data(), order, pw, items);
}

void replicate_experts(const std::vector<double>& weights, int num_physical, std::vector<int>& phy2log,
                       std::vector<int>& rank, std::vector<int>& logcnt) {
    const int n = static_cast<int>(weights.size());
    GRACE_CHECK_ARG(n >= 1, "replicate_experts: no logical experts");
    GRACE_CHECK_ARG(num_physical >= n, "replicate_experts: num_physical (", num_physical,
                    ") must be >= the number of logical experts (", n, ")");
    phy2log.assign(num_physical, -1);
    rank.assign(num_physical, 0);
    logcnt.assign(n, 0);
    replicate_row(weights.data(), n, num_physical, phy2log.data(), rank.data(), logcnt.data());
}

EplbResult rebalance_experts(const std::vector<double>& weight, int num_layers, int num_experts, int num_replicas,
                             int num_groups, int num_nodes, int num_gpus) {
    GRACE_CHECK_ARG(num_layers >= 1, "rebalance_experts: num_layers must be >= 1, got ", num_layers);
    GRACE_CHECK_ARG(num_experts >= 1, "rebalance_experts: num_experts must be >= 1, got ", num_experts);
    GRACE_CHECK_ARG(weight.size() == static_cast<size_t>(num_layers) * num_experts, "rebalance_experts: weight has ",
                    weight.size(), " entries, expected num_layers * num_experts = ", num_layers * num_experts);
    GRACE_CHECK_ARG(num_groups >= 1 && num_nodes >= 1 && num_gpus >= 1,
                    "rebalance_experts: num_groups, num_nodes and num_gpus must be >= 1, got ", num_groups, ", ",
                    num_nodes, ", ", num_gpus);
    GRACE_CHECK_ARG(num_replicas >= num_experts, "rebalance_experts: num_replicas (", num_replicas,
                    ") must be >= num_experts (", num_experts, ")");
    GRACE_CHECK_ARG(num_replicas % num_gpus == 0, "rebalance_experts: num_replicas (", num_replicas,
                    ") is not a multiple of num_gpus (", num_gpus, ")");
    GRACE_CHECK_ARG(num_gpus % num_nodes == 0, "rebalance_experts: num_gpus (", num_gpus,
                    ") is not a multiple of num_nodes (", num_nodes, ")");
    if (num_groups % num_nodes != 0) {  // global policy
        num_groups = 1;
        num_nodes = 1;
    }
    GRACE_CHECK_ARG(num_experts % num_groups == 0, "rebalance_experts: num_experts (", num_experts,
                    ") is not a multiple of num_groups (", num_groups, ")");
    GRACE_CHECK_ARG(num_replicas % num_nodes == 0, "rebalance_experts: num_replicas (", num_replicas,
                    ") is not a multiple of num_nodes (", num_nodes, ")");
    const int group_size = num_experts / num_groups;
    const int groups_per_node = num_groups / num_nodes;
    const int log_per_node = num_experts / num_nodes;  // = groups_per_node * group_size
    const int phy_per_node = num_replicas / num_nodes;
    const int gpus_per_node = num_gpus / num_nodes;
    const int phy_per_gpu = num_replicas / num_gpus;
    GRACE_CHECK_ARG(phy_per_node >= log_per_node, "rebalance_experts: ", phy_per_node,
                    " physical slots per node cannot hold its ", log_per_node, " logical experts");

    EplbResult res;
    res.num_layers = num_layers;
    res.num_logical = num_experts;
    res.num_physical = num_replicas;
    res.phy2log.assign(static_cast<size_t>(num_layers) * num_replicas, -1);
    res.logcnt.assign(static_cast<size_t>(num_layers) * num_experts, 0);
    std::vector<int> phyrank(static_cast<size_t>(num_layers) * num_replicas, 0);

    // Scratch, reused across layers.
    std::vector<double> group_w(num_groups), mlog_w(log_per_node), phy_w(phy_per_node);
    std::vector<int> gpack(num_groups), grank(num_groups), mlog2log(num_experts);
    std::vector<int> phy2mlog(phy_per_node), prank(phy_per_node), mlogcnt(log_per_node);
    std::vector<int> ppack(phy_per_node), prip(phy_per_node), order, items;
    std::vector<double> pw;

    for (int l = 0; l < num_layers; ++l) {
        const double* w = weight.data() + static_cast<size_t>(l) * num_experts;
        for (int e = 0; e < num_experts; ++e) {
            GRACE_CHECK_ARG(w[e] >= 0, "rebalance_experts: weight[", l, ", ", e, "] = ", w[e], " is negative");
        }
        // Step 1: groups -> nodes. Logical expert e of group g lands at node-major position
        // mlog = (pack * groups_per_node + rank) * group_size + e % group_size.
        for (int g = 0; g < num_groups; ++g) {
            double s = 0;
            for (int j = 0; j < group_size; ++j) s += w[g * group_size + j];
            group_w[g] = s;
        }
        pack_row(group_w.data(), num_groups, num_nodes, gpack.data(), grank.data(), order, pw, items);
        for (int g = 0; g < num_groups; ++g) {
            const int base = (gpack[g] * groups_per_node + grank[g]) * group_size;
            for (int j = 0; j < group_size; ++j) mlog2log[base + j] = g * group_size + j;
        }
        int* out_phy2log = res.phy2log.data() + static_cast<size_t>(l) * num_replicas;
        int* out_rank = phyrank.data() + static_cast<size_t>(l) * num_replicas;
        int* out_logcnt = res.logcnt.data() + static_cast<size_t>(l) * num_experts;
        for (int node = 0; node < num_nodes; ++node) {
            const int* m2l = mlog2log.data() + node * log_per_node;
            // Step 2: replicate inside the node.
            for (int i = 0; i < log_per_node; ++i) mlog_w[i] = w[m2l[i]];
            replicate_row(mlog_w.data(), log_per_node, phy_per_node, phy2mlog.data(), prank.data(), mlogcnt.data());
            // Step 3: physical experts -> GPUs of the node, by load per replica.
            for (int p = 0; p < phy_per_node; ++p) phy_w[p] = mlog_w[phy2mlog[p]] / mlogcnt[phy2mlog[p]];
            pack_row(phy_w.data(), phy_per_node, gpus_per_node, ppack.data(), prip.data(), order, pw, items);
            for (int p = 0; p < phy_per_node; ++p) {
                const int slot = node * phy_per_node + ppack[p] * phy_per_gpu + prip[p];
                out_phy2log[slot] = m2l[phy2mlog[p]];
                out_rank[slot] = prank[p];
            }
            for (int i = 0; i < log_per_node; ++i) out_logcnt[m2l[i]] = mlogcnt[i];
        }
    }

    int max_cnt = 0;
    for (int c : res.logcnt) max_cnt = std::max(max_cnt, c);
    res.max_replicas = max_cnt;
    res.log2phy.assign(static_cast<size_t>(num_layers) * num_experts * max_cnt, -1);
    for (int l = 0; l < num_layers; ++l) {
        for (int p = 0; p < num_replicas; ++p) {
            const size_t i = static_cast<size_t>(l) * num_replicas + p;
            const int e = res.phy2log[i];
            GRACE_ASSERT(e >= 0 && phyrank[i] < max_cnt);
            res.log2phy[(static_cast<size_t>(l) * num_experts + e) * max_cnt + phyrank[i]] = p;
        }
    }
    return res;
}

}  // namespace grace
