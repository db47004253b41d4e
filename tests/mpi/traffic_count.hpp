#pragma once
// Independent count of the token copies each scheme sends per link class (spec §6), replayed over a whole trace
// in trace order with its own ReplicaRouter; the MPI tests check the runtime's measured bytes against it.
// (The evaluator on branch `eval` will expose its own per-layer count; this one stays as a second opinion.)
#include <algorithm>
#include <cstdint>
#include <vector>

#include "grace/plan.hpp"
#include "grace/routing.hpp"
#include "grace/runtime.hpp"
#include "grace/topology.hpp"

namespace testing_count {

struct Counts {
    int64_t copies[2] = {0, 0};          // [intra-node, cross-node] token copies (dispatch; combine is equal)
    int64_t metadata_bytes[2] = {0, 0};  // runtime metadata: flat 8 B/copy, dedup 8k, hsc cross 12k / intra 8k
};

/// ids: layer l's ids of token 0; token t's ids are at ids + t * token_stride.
inline Counts count_layer_copies(const grace::LayerPlan& layer, const grace::Topology& topo,
                                 grace::RoutingPolicy policy, uint64_t seed, const int32_t* ids, int64_t T, int k,
                                 int64_t token_stride, grace::CommScheme scheme) {
    using grace::CommScheme;
    grace::ReplicaRouter router(layer, topo, policy, seed);
    const int G = topo.num_gpus(), M = topo.gpus_per_node;
    Counts c;
    std::vector<int> dest(k);
    for (int64_t t = 0; t < T; ++t) {
        const int h = grace::home_gpu(t, T, G);
        if (t == 0 || grace::home_gpu(t - 1, T, G) != h) router.set_token_origin(h, t);  // per-rank token indices
        const int hn = topo.node_of(h);
        for (int j = 0; j < k; ++j) dest[j] = router.route(h, ids[t * token_stride + j], t, j, k);
        auto add = [&](int cls, int64_t meta) {
            c.copies[cls] += 1;
            c.metadata_bytes[cls] += meta;
        };
        if (scheme == CommScheme::kFlat) {
            for (int d : dest)
                if (d != h) add(topo.node_of(d) == hn ? 0 : 1, 8);
            continue;
        }
        std::vector<int> gpus(dest);
        std::sort(gpus.begin(), gpus.end());
        gpus.erase(std::unique(gpus.begin(), gpus.end()), gpus.end());
        if (scheme == CommScheme::kFlatDedup) {
            for (int d : gpus)
                if (d != h) add(topo.node_of(d) == hn ? 0 : 1, 8 * k);
            continue;
        }
        // HSC: one cross copy per remote destination node (to the peer b*M + h%M); inside each node, one copy per
        // destination GPU other than the node's entry point (h at home, the peer elsewhere).
        std::vector<int> nodes;
        for (int d : gpus) nodes.push_back(topo.node_of(d));
        nodes.erase(std::unique(nodes.begin(), nodes.end()), nodes.end());
        for (int b : nodes)
            if (b != hn) add(1, 12 * k);
        for (int d : gpus) {
            const int b = topo.node_of(d);
            const int entry = b == hn ? h : b * M + h % M;
            if (d != entry) add(0, 8 * k);
        }
    }
    return c;
}

}  // namespace testing_count
