// EPLB (spec §8): the golden vectors of EPLB's README example for both policies, plus invariants.

#include "grace/eplb.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "grace/error.hpp"

namespace grace {
namespace {

const std::vector<double> kReadmeWeight = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
                                           20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};

// Every structural invariant EPLB's output must satisfy, whatever the input.
void expect_consistent(const EplbResult& r, int num_gpus) {
    const int L = r.num_layers, E = r.num_logical, P = r.num_physical, X = r.max_replicas;
    ASSERT_EQ(r.phy2log.size(), static_cast<size_t>(L) * P);
    ASSERT_EQ(r.logcnt.size(), static_cast<size_t>(L) * E);
    ASSERT_EQ(r.log2phy.size(), static_cast<size_t>(L) * E * X);
    const int per_gpu = P / num_gpus;
    for (int l = 0; l < L; ++l) {
        int total = 0, max_cnt = 0;
        for (int e = 0; e < E; ++e) {
            const int c = r.logcnt[l * E + e];
            EXPECT_GE(c, 1) << "layer " << l << " expert " << e << " has no replica";
            total += c;
            max_cnt = std::max(max_cnt, c);
            // log2phy lists exactly c slots, each pointing back at e, then -1 padding.
            for (int x = 0; x < X; ++x) {
                const int p = r.log2phy[(l * E + e) * X + x];
                if (x < c) {
                    ASSERT_GE(p, 0);
                    ASSERT_LT(p, P);
                    EXPECT_EQ(r.phy2log[l * P + p], e);
                } else {
                    EXPECT_EQ(p, -1);
                }
            }
            const int seen =
                static_cast<int>(std::count(r.phy2log.begin() + l * P, r.phy2log.begin() + (l + 1) * P, e));
            EXPECT_EQ(seen, c);
        }
        EXPECT_EQ(total, P);
        EXPECT_LE(max_cnt, X);
        (void)per_gpu;
    }
}

TEST(Eplb, HierarchicalGoldenVector) {
    const EplbResult r = rebalance_experts(kReadmeWeight, 2, 12, 16, 4, 2, 8);
    const std::vector<int> phy2log = {5, 6,  5, 7, 8, 4,  3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                                      7, 10, 6, 8, 6, 11, 8, 9, 2,  4, 5,  1, 5, 0, 3,  1};
    const std::vector<int> logcnt = {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1};
    EXPECT_EQ(r.phy2log, phy2log);
    EXPECT_EQ(r.logcnt, logcnt);
    EXPECT_EQ(r.max_replicas, 2);
    expect_consistent(r, 8);
}

TEST(Eplb, GlobalGoldenVector) {
    const EplbResult r = rebalance_experts(kReadmeWeight, 2, 12, 16, 3, 2, 8);  // 3 % 2 != 0: global
    const std::vector<int> phy2log = {10, 6,  10, 7, 0, 2,  11, 4, 5, 9, 5, 4, 8, 3, 1, 1,
                                      1,  10, 2,  4, 5, 11, 5,  0, 6, 7, 6, 3, 8, 8, 9, 7};
    const std::vector<int> logcnt = {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1};
    EXPECT_EQ(r.phy2log, phy2log);
    EXPECT_EQ(r.logcnt, logcnt);
    expect_consistent(r, 8);
}

TEST(Eplb, Log2PhyOfGoldenVector) {
    // Layer 0, hierarchical: expert 5 sits in slots 0 and 2 (replica rank 0 then 1), expert 7 in slot 3 only.
    const EplbResult r = rebalance_experts(kReadmeWeight, 2, 12, 16, 4, 2, 8);
    const int X = r.max_replicas;
    EXPECT_EQ(r.log2phy[5 * X + 0], 0);
    EXPECT_EQ(r.log2phy[5 * X + 1], 2);
    EXPECT_EQ(r.log2phy[7 * X + 0], 3);
    EXPECT_EQ(r.log2phy[7 * X + 1], -1);
}

TEST(Eplb, BalancedPackingHeaviestFirstToLightest) {
    std::vector<int> pack, rank;
    balanced_packing({5, 1, 4, 2, 3, 6}, 2, pack, rank);
    // Order 6,5,4,3,2,1: 6->p0, 5->p1, 4->p1 (5<6), 3->p0 (6<9), 2->p0 (9<=9, lower index), 1->p1.
    EXPECT_EQ(pack, (std::vector<int>{1, 1, 1, 0, 0, 0}));
    EXPECT_EQ(rank, (std::vector<int>{0, 2, 1, 2, 1, 0}));
    // One item per pack: EPLB's identity shortcut.
    balanced_packing({1, 9, 5}, 3, pack, rank);
    EXPECT_EQ(pack, (std::vector<int>{0, 1, 2}));
    EXPECT_EQ(rank, (std::vector<int>{0, 0, 0}));
    EXPECT_THROW(balanced_packing({1, 2, 3}, 2, pack, rank), Error);
}

TEST(Eplb, ReplicateWaterFilling) {
    std::vector<int> phy2log, rank, logcnt;
    replicate_experts({10, 4, 7}, 6, phy2log, rank, logcnt);
    // Extra slots: 10 (10/1) -> 7 (7/1 > 5) -> 10 (5 > 4 = 4 > 3.5; 5 wins).
    EXPECT_EQ(phy2log, (std::vector<int>{0, 1, 2, 0, 2, 0}));
    EXPECT_EQ(rank, (std::vector<int>{0, 0, 0, 1, 1, 2}));
    EXPECT_EQ(logcnt, (std::vector<int>{3, 1, 2}));
    EXPECT_THROW(replicate_experts({1, 2, 3}, 2, phy2log, rank, logcnt), Error);
}

TEST(Eplb, InvariantsAtDeepSeekScale) {
    const int L = 4, E = 256;
    std::vector<double> w(L * E);
    uint64_t s = 42;
    for (double& x : w) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x = static_cast<double>((s >> 33) % 100000) + 1.0;
    }
    const EplbResult h = rebalance_experts(w, L, E, 288, 8, 4, 32);
    expect_consistent(h, 32);
    // Hierarchical: every slot of node k holds an expert whose group was packed on node k, so each node
    // holds exactly 2 whole groups (64 logical experts) and nothing else.
    for (int l = 0; l < L; ++l) {
        for (int node = 0; node < 4; ++node) {
            std::vector<int> groups;
            for (int p = node * 72; p < (node + 1) * 72; ++p) groups.push_back(h.phy2log[l * 288 + p] / 32);
            std::sort(groups.begin(), groups.end());
            groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
            EXPECT_EQ(groups.size(), 2u);
        }
    }
    const EplbResult g = rebalance_experts(w, L, E, 288, 7, 4, 32);
    expect_consistent(g, 32);
}

TEST(Eplb, RejectsBadArguments) {
    EXPECT_THROW(rebalance_experts(kReadmeWeight, 2, 12, 15, 4, 2, 8), Error);  // 15 % 8
    EXPECT_THROW(rebalance_experts(kReadmeWeight, 2, 12, 16, 4, 3, 8), Error);  // num_gpus 8 % num_nodes 3 != 0
    EXPECT_THROW(rebalance_experts(kReadmeWeight, 2, 12, 8, 4, 2, 8), Error);   // fewer slots than experts
    EXPECT_THROW(rebalance_experts(kReadmeWeight, 3, 12, 16, 4, 2, 8), Error);  // wrong weight size
    try {
        rebalance_experts(kReadmeWeight, 2, 12, 15, 4, 2, 8);
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
        EXPECT_NE(std::string(e.what()).find("15"), std::string::npos);
    }
}

}  // namespace
}  // namespace grace
