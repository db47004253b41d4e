#pragma once
// Random but structured routing statistics for planner tests: tokens draw k distinct experts from a skewed
// popularity times a topic preference (a few topics, each favouring a block of experts), so that affinity has
// clusters and loads are skewed, as real routing is.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.hpp"
#include "grace/stats.hpp"

namespace grace::testing {

inline RoutingStats make_random_stats(int L, int E, int k, int T, uint64_t seed, int topics = 4) {
    RoutingStats st;
    st.num_layers = L;
    st.num_experts = E;
    st.top_k = k;
    st.num_tokens = T;
    st.model = "test";
    st.dataset = "random";
    st.affinity.assign(static_cast<size_t>(L) * E * E, 0);
    st.load.assign(static_cast<size_t>(L) * E, 0);
    Rng rng(seed);
    for (int l = 0; l < L; ++l) {
        std::vector<double> pop(E);
        for (int e = 0; e < E; ++e) pop[e] = std::exp(2.0 * rng.uniform());
        std::vector<int> perm(E);
        for (int e = 0; e < E; ++e) perm[e] = e;
        for (int e = E - 1; e > 0; --e) std::swap(perm[e], perm[rng.below(e + 1)]);
        for (int t = 0; t < T; ++t) {
            const int topic = static_cast<int>(rng.below(topics));
            std::vector<double> w(E);
            for (int e = 0; e < E; ++e) w[e] = pop[e] * ((perm[e] * topics / E) == topic ? 12.0 : 1.0);
            std::vector<int> chosen;
            for (int j = 0; j < k; ++j) {
                double sum = 0;
                for (double x : w) sum += x;
                double u = rng.uniform() * sum;
                int pick = E - 1;
                for (int e = 0; e < E; ++e) {
                    if (w[e] <= 0) continue;
                    if (u < w[e]) {
                        pick = e;
                        break;
                    }
                    u -= w[e];
                }
                while (w[pick] <= 0) pick = (pick + E - 1) % E;
                chosen.push_back(pick);
                w[pick] = 0;
            }
            for (int a : chosen) {
                ++st.load[static_cast<size_t>(l) * E + a];
                for (int b : chosen)
                    if (a != b) ++st.affinity[(static_cast<size_t>(l) * E + a) * E + b];
            }
        }
    }
    return st;
}

}  // namespace grace::testing
