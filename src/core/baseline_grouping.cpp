/// @file baseline_grouping.cpp
/// Baseline groupings (spec §8): Occult and C2R reconstructions, METIS k-way, vanilla.

#include <algorithm>
#include <cmath>
#include <mutex>
#include <numeric>

#include "grace/error.hpp"
#include "grace/grouping.hpp"
#include "grouping_internal.hpp"

#ifdef GRACE_HAVE_METIS
#include <metis.h>
#endif

namespace grace {
namespace {

struct Pair {
    double w;
    int i, j;
};

/// Pairs i < j with positive affinity, heaviest first, ties by (i, j).
std::vector<Pair> sorted_pairs(const std::vector<double>& a, int E) {
    std::vector<Pair> p;
    for (int i = 0; i < E; ++i)
        for (int j = i + 1; j < E; ++j)
            if (a[static_cast<size_t>(i) * E + j] > 0) p.push_back({a[static_cast<size_t>(i) * E + j], i, j});
    std::sort(p.begin(), p.end(), [](const Pair& x, const Pair& y) {
        if (x.w != y.w) return x.w > y.w;
        return x.i != y.i ? x.i < y.i : x.j < y.j;
    });
    return p;
}

/// Target sizes when n does not divide E: the first E % n groups get one more.
std::vector<int> target_sizes(int E, int n) {
    std::vector<int> t(n, E / n);
    for (int g = 0; g < E % n; ++g) ++t[g];
    return t;
}

/// Affinity of expert e to a set of experts.
double affinity_to(const std::vector<double>& a, int E, int e, const std::vector<int>& set) {
    double s = 0;
    for (int j : set) s += a[static_cast<size_t>(e) * E + j];
    return s;
}

}  // namespace

Grouping vanilla_grouping(int num_experts, int num_groups) {
    GRACE_CHECK_ARG(num_experts >= 1, "vanilla_grouping: num_experts must be >= 1, got ", num_experts);
    detail::check_num_groups(num_experts, num_groups, "vanilla_grouping");
    Grouping g{num_groups, std::vector<int>(num_experts)};
    for (int e = 0; e < num_experts; ++e)
        g.group_of[e] = static_cast<int>(static_cast<long long>(e) * num_groups / num_experts);
    return g;
}

Grouping occult_grouping(const std::vector<double>& affinity, int num_experts, int num_groups) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "occult_grouping");
    detail::check_num_groups(num_experts, num_groups, "occult_grouping");
    const int E = num_experts, n = num_groups;
    const int lo = E / n, hi = (E + n - 1) / n;
    const int num_big = E % n;  // groups of size hi when n does not divide E

    // 1. Agglomerate clusters along the heaviest pairs while a merge still fits an equal-size group.
    std::vector<int> parent(E), csize(E, 1);
    std::iota(parent.begin(), parent.end(), 0);
    auto find = [&](int x) {
        while (parent[x] != x) x = parent[x] = parent[parent[x]];
        return x;
    };
    int full_big = 0;
    for (const Pair& p : sorted_pairs(a, E)) {
        const int x = find(p.i), y = find(p.j);
        if (x == y) continue;
        const int s = csize[x] + csize[y];
        if (s > hi) continue;
        if (num_big > 0 && s == hi) {
            if (full_big == num_big) continue;
            ++full_big;
        }
        const int root = std::min(x, y), child = std::max(x, y);
        parent[child] = root;
        csize[root] = s;
    }
    // 2. Pack the clusters into groups with the exact target sizes: largest cluster first, into the group with
    //    room and the highest affinity to it; a cluster that fits nowhere whole is placed member by member.
    std::vector<std::vector<int>> clusters(E);
    for (int e = 0; e < E; ++e) clusters[find(e)].push_back(e);
    std::vector<int> order;
    for (int r = 0; r < E; ++r)
        if (!clusters[r].empty()) order.push_back(r);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return clusters[x].size() > clusters[y].size(); });
    const std::vector<int> target = target_sizes(E, n);
    std::vector<std::vector<int>> groups(n);
    Grouping g{n, std::vector<int>(E, -1)};
    auto place = [&](const std::vector<int>& members) {
        int best = -1;
        double best_aff = -1;
        for (int h = 0; h < n; ++h) {
            if (static_cast<int>(groups[h].size() + members.size()) > target[h]) continue;
            double s = 0;
            for (int e : members) s += affinity_to(a, E, e, groups[h]);
            if (s > best_aff) {
                best_aff = s;
                best = h;
            }
        }
        if (best < 0) return false;
        for (int e : members) {
            groups[best].push_back(e);
            g.group_of[e] = best;
        }
        return true;
    };
    for (int r : order) {
        if (place(clusters[r])) continue;
        for (int e : clusters[r]) {
            const bool ok = place({e});
            GRACE_ASSERT(ok);
        }
    }
    // 3. Improving swaps (and moves between groups of size hi and lo, which keep the size multiset).
    detail::GroupState st(a.data(), E, g);
    detail::refine_groups(a.data(), E, st, lo, hi);
    return detail::canonical(st.grouping());
}

Grouping c2r_grouping(const std::vector<double>& affinity, int num_experts, int num_groups) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "c2r_grouping");
    detail::check_num_groups(num_experts, num_groups, "c2r_grouping");
    const int E = num_experts, n = num_groups;
    const std::vector<int> target = target_sizes(E, n);
    std::vector<std::vector<int>> groups(n);
    Grouping g{n, std::vector<int>(E, -1)};
    auto room = [&](int h) { return target[h] - static_cast<int>(groups[h].size()); };
    double mean_pair = 0;
    for (double x : a) mean_pair += x;
    mean_pair = E > 1 ? mean_pair / (static_cast<double>(E) * (E - 1)) : 0.0;
    auto put = [&](int e, int h) {
        groups[h].push_back(e);
        g.group_of[e] = h;
    };
    for (const Pair& p : sorted_pairs(a, E)) {
        const int gi = g.group_of[p.i], gj = g.group_of[p.j];
        if (gi < 0 && gj < 0) {
            // Both free: the group with room for two whose members are, on average, most co-activated with the
            // pair; a fresh (empty) group scores the layer's mean pair affinity, so a pair only joins a group
            // it is more attached to than to a random expert. Ties: lower index.
            int best = -1;
            double best_score = -1;
            for (int h = 0; h < n; ++h) {
                if (room(h) < 2) continue;
                const double score = groups[h].empty()
                                         ? mean_pair
                                         : (affinity_to(a, E, p.i, groups[h]) + affinity_to(a, E, p.j, groups[h])) /
                                               (2.0 * static_cast<double>(groups[h].size()));
                if (score > best_score) {
                    best_score = score;
                    best = h;
                }
            }
            if (best >= 0) {
                put(p.i, best);
                put(p.j, best);
            }
        } else if (gi >= 0 && gj < 0 && room(gi) > 0) {
            put(p.j, gi);
        } else if (gj >= 0 && gi < 0 && room(gj) > 0) {
            put(p.i, gj);
        }
    }
    for (int e = 0; e < E; ++e) {  // leftovers: the group with room and the highest affinity
        if (g.group_of[e] >= 0) continue;
        int best = -1;
        double best_aff = -1;
        for (int h = 0; h < n; ++h) {
            if (room(h) <= 0) continue;
            const double s = affinity_to(a, E, e, groups[h]);
            if (s > best_aff) {
                best_aff = s;
                best = h;
            }
        }
        GRACE_ASSERT(best >= 0);
        put(e, best);
    }
    return detail::canonical(g);
}

bool metis_available() {
#ifdef GRACE_HAVE_METIS
    return true;
#else
    return false;
#endif
}

Grouping metis_grouping(const std::vector<double>& affinity, const std::vector<double>& load, int num_experts,
                        int num_groups, uint64_t seed, double imbalance, int max_edges_per_vertex) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "metis_grouping");
    detail::check_num_groups(num_experts, num_groups, "metis_grouping");
    GRACE_CHECK_ARG(static_cast<int>(load.size()) == num_experts, "metis_grouping: load has ", load.size(),
                    " entries, expected ", num_experts);
    GRACE_CHECK_ARG(std::isfinite(imbalance) && imbalance >= 1.0, "metis_grouping: imbalance must be >= 1, got ",
                    imbalance);
    for (int e = 0; e < num_experts; ++e) {
        GRACE_CHECK_ARG(std::isfinite(load[e]) && load[e] >= 0, "metis_grouping: load[", e, "] = ", load[e],
                        " must be finite and >= 0");
    }
#ifndef GRACE_HAVE_METIS
    (void)seed;
    throw Error(ErrorCode::kUnsupported, "metis_grouping: grace was built without METIS (install libmetis-dev)");
#else
    const int E = num_experts, n = num_groups;
    if (n == 1) return Grouping{1, std::vector<int>(E, 0)};
    // Integer weights: affinity scaled so the heaviest edge is 1e6 (each present edge >= 1), load so the
    // heaviest expert is 1e5 (each >= 1), which keeps sums far inside idx_t.
    const double amax = *std::max_element(a.begin(), a.end());
    const double lmax = *std::max_element(load.begin(), load.end());
    // keep[i * E + j]: edge (i, j) is among the heaviest max_edges_per_vertex of i or of j (all when 0).
    const bool sparse = max_edges_per_vertex > 0 && max_edges_per_vertex < E - 1;
    std::vector<char> keep(static_cast<size_t>(E) * E, sparse ? 0 : 1);
    if (sparse) {
        std::vector<int> order(E);
        for (int i = 0; i < E; ++i) {
            for (int j = 0; j < E; ++j) order[j] = j;
            const double* row = a.data() + static_cast<size_t>(i) * E;
            // heaviest first, ties to the lower index (deterministic)
            std::partial_sort(order.begin(), order.begin() + max_edges_per_vertex + 1, order.end(), [&](int x, int y) {
                return row[x] != row[y] ? row[x] > row[y] : x < y;
            });
            int kept = 0;
            for (int q = 0; q <= max_edges_per_vertex && kept < max_edges_per_vertex; ++q) {
                const int j = order[q];
                if (j == i) continue;
                keep[static_cast<size_t>(i) * E + j] = keep[static_cast<size_t>(j) * E + i] = 1;
                ++kept;
            }
        }
    }
    std::vector<idx_t> xadj{0}, adjncy, adjwgt, vwgt(E);
    for (int i = 0; i < E; ++i) {
        for (int j = 0; j < E; ++j) {
            const double w = a[static_cast<size_t>(i) * E + j];
            if (i == j || w <= 0 || !keep[static_cast<size_t>(i) * E + j]) continue;
            adjncy.push_back(j);
            adjwgt.push_back(std::max<idx_t>(1, static_cast<idx_t>(std::llround(w / amax * 1e6))));
        }
        xadj.push_back(static_cast<idx_t>(adjncy.size()));
        vwgt[i] = lmax > 0 ? std::max<idx_t>(1, static_cast<idx_t>(std::llround(load[i] / lmax * 1e5))) : 1;
    }
    idx_t nvtxs = E, ncon = 1, nparts = n, objval = 0;
    real_t ubvec = static_cast<real_t>(imbalance);
    idx_t options[METIS_NOPTIONS];
    METIS_SetDefaultOptions(options);
    options[METIS_OPTION_SEED] = static_cast<idx_t>(seed & 0x7fffffff);
    options[METIS_OPTION_NUMBERING] = 0;
    std::vector<idx_t> part(E, 0);
    // METIS keeps its random state in process globals (GKlib): concurrent calls would make the result depend
    // on thread timing, so every call in the process is serialized here.
    static std::mutex metis_mutex;
    std::lock_guard<std::mutex> lock(metis_mutex);
    const int rc = METIS_PartGraphKway(&nvtxs, &ncon, xadj.data(), adjncy.empty() ? nullptr : adjncy.data(),
                                       vwgt.data(), nullptr, adjncy.empty() ? nullptr : adjwgt.data(), &nparts, nullptr,
                                       &ubvec, options, &objval, part.data());
    GRACE_CHECK(rc == METIS_OK, ErrorCode::kBackend, "metis_grouping: METIS_PartGraphKway returned ", rc);
    Grouping g{n, std::vector<int>(part.begin(), part.end())};
    return detail::canonical(g);
#endif
}

}  // namespace grace
