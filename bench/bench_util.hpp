#pragma once
// Shared inputs of the grouping and EPLB benchmarks: deterministic, realistic shapes.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace grace::bench {

inline uint64_t next_u64(uint64_t& s) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return s >> 33;
}

/// Block-structured affinity [E, E]: E experts in `blocks` clusters of random (unequal) sizes, intra-block
/// pair counts ~ 40x the inter-block ones, with multiplicative noise — the shape profiled MoE layers show.
inline std::vector<double> block_affinity(int E, int blocks, uint64_t seed) {
    std::vector<int> block_of(E);
    uint64_t s = seed;
    for (int e = 0; e < E; ++e) block_of[e] = static_cast<int>(next_u64(s) % blocks);
    std::vector<double> a(static_cast<size_t>(E) * E, 0.0);
    for (int i = 0; i < E; ++i)
        for (int j = i + 1; j < E; ++j) {
            const double base = block_of[i] == block_of[j] ? 400.0 : 10.0;
            const double w = base * (0.25 + static_cast<double>(next_u64(s) % 1000) / 666.0);
            a[static_cast<size_t>(i) * E + j] = a[static_cast<size_t>(j) * E + i] =
                static_cast<double>(static_cast<int64_t>(w));
        }
    return a;
}

/// Zipf-like per-expert loads [L, E] (token counts), shuffled per layer.
inline std::vector<double> skewed_loads(int L, int E, uint64_t seed) {
    std::vector<double> w(static_cast<size_t>(L) * E);
    uint64_t s = seed;
    for (int l = 0; l < L; ++l)
        for (int e = 0; e < E; ++e) {
            const double rank = 1.0 + static_cast<double>(next_u64(s) % E);
            w[static_cast<size_t>(l) * E + e] =
                static_cast<double>(static_cast<int64_t>(200000.0 / rank)) + static_cast<double>(next_u64(s) % 97);
        }
    return w;
}

}  // namespace grace::bench
