/// @file grouping.cpp
/// Grouping metrics (Equations 1-2), controlled non-uniform grouping and the knee search (spec §3).

#include "grace/grouping.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "grace/error.hpp"
#include "grouping_internal.hpp"

namespace grace {

std::vector<int> Grouping::sizes() const {
    std::vector<int> s(std::max(num_groups, 0), 0);
    for (int g : group_of) {
        GRACE_CHECK_ARG(g >= 0 && g < num_groups, "Grouping: group id ", g, " outside [0, ", num_groups, ")");
        ++s[g];
    }
    return s;
}

std::vector<std::vector<int>> Grouping::members() const {
    std::vector<std::vector<int>> m(std::max(num_groups, 0));
    for (int e = 0; e < static_cast<int>(group_of.size()); ++e) {
        const int g = group_of[e];
        GRACE_CHECK_ARG(g >= 0 && g < num_groups, "Grouping: group id ", g, " of expert ", e, " outside [0, ",
                        num_groups, ")");
        m[g].push_back(e);
    }
    return m;
}

namespace detail {

std::vector<double> clean_affinity(const std::vector<double>& affinity, int num_experts, const char* fn) {
    GRACE_CHECK_ARG(num_experts >= 1, fn, ": num_experts must be >= 1, got ", num_experts);
    const size_t E = static_cast<size_t>(num_experts);
    GRACE_CHECK_ARG(affinity.size() == E * E, fn, ": affinity has ", affinity.size(),
                    " entries, expected E*E = ", E * E, " for E = ", num_experts);
    std::vector<double> a(E * E, 0.0);
    for (size_t i = 0; i < E; ++i) {
        for (size_t j = i + 1; j < E; ++j) {
            const double x = affinity[i * E + j], y = affinity[j * E + i];
            GRACE_CHECK_ARG(std::isfinite(x) && std::isfinite(y) && x >= 0 && y >= 0, fn, ": affinity[", i, ", ", j,
                            "] = ", x, " / [", j, ", ", i, "] = ", y, " must be finite and >= 0");
            a[i * E + j] = a[j * E + i] = 0.5 * (x + y);
        }
    }
    return a;
}

void check_num_groups(int num_experts, int num_groups, const char* fn) {
    GRACE_CHECK_ARG(num_groups >= 1, fn, ": num_groups must be >= 1, got ", num_groups);
    GRACE_CHECK_ARG(num_groups <= num_experts, fn, ": num_groups (", num_groups, ") exceeds num_experts (", num_experts,
                    ")");
}

Grouping canonical(const Grouping& g) {
    const int n = g.num_groups;
    std::vector<int> relabel(n, -1);
    int next = 0;
    for (int x : g.group_of) {
        if (relabel[x] < 0) relabel[x] = next++;
    }
    for (int x = 0; x < n; ++x) {
        if (relabel[x] < 0) relabel[x] = next++;
    }
    Grouping out{n, g.group_of};
    for (int& x : out.group_of) x = relabel[x];
    return out;
}

GroupState::GroupState(const double* a, int num_experts, const Grouping& start)
    : a_(a),
      e_(num_experts),
      n_(start.num_groups),
      group_of_(start.group_of),
      size_(start.num_groups, 0),
      aff_(static_cast<size_t>(num_experts) * start.num_groups, 0.0) {
    for (int g : group_of_) ++size_[g];
    for (int j = 0; j < e_; ++j) {  // row j of A, added to the row of j's group (A symmetric, zero diagonal)
        const double* row = a_ + static_cast<size_t>(j) * e_;
        double* out = aff_.data() + static_cast<size_t>(group_of_[j]) * e_;
        for (int e = 0; e < e_; ++e) out[e] += row[e];
    }
}

void GroupState::move(int e, int to) {
    const int from = group_of_[e];
    if (from == to) return;
    const double* row = a_ + static_cast<size_t>(e) * e_;
    double* af = aff_.data() + static_cast<size_t>(from) * e_;
    double* at = aff_.data() + static_cast<size_t>(to) * e_;
    for (int x = 0; x < e_; ++x) {
        af[x] -= row[x];
        at[x] += row[x];
    }
    group_of_[e] = to;
    --size_[from];
    ++size_[to];
}

double GroupState::intra_sum() const {
    double s = 0;
    for (int e = 0; e < e_; ++e) s += aff(e, group_of_[e]);
    return 0.5 * s;
}

Grouping GroupState::grouping() const { return Grouping{n_, group_of_}; }

void repair_sizes(GroupState& st, int lo, int hi) {
    const int n = st.num_groups();
    const int E = st.num_experts();
    // Step 1: shrink oversized groups, lowest intra-affinity expert first, to the best group with room.
    for (int g = 0; g < n; ++g) {
        while (st.size(g) > hi) {
            int worst = -1;
            for (int e = 0; e < E; ++e) {
                if (st.group(e) == g && (worst < 0 || st.aff(e, g) < st.aff(worst, g))) worst = e;
            }
            int best = -1;
            for (int h = 0; h < n; ++h) {
                if (h == g || st.size(h) >= hi) continue;
                if (best < 0 || st.aff(worst, h) > st.aff(worst, best) ||
                    (st.aff(worst, h) == st.aff(worst, best) && st.size(h) < st.size(best)))
                    best = h;
            }
            GRACE_ASSERT(worst >= 0 && best >= 0);
            st.move(worst, best);
        }
    }
    // Step 2: fill undersized groups with the expert that gains most from the move.
    for (int g = 0; g < n; ++g) {
        while (st.size(g) < lo) {
            int best = -1;
            double best_gain = -std::numeric_limits<double>::infinity();
            for (int e = 0; e < E; ++e) {
                const int h = st.group(e);
                if (h == g || st.size(h) <= lo) continue;
                const double gain = st.aff(e, g) - st.aff(e, h);
                if (gain > best_gain) {
                    best_gain = gain;
                    best = e;
                }
            }
            GRACE_ASSERT(best >= 0);
            st.move(best, g);
        }
    }
}

void refine_groups(const double* a, int num_experts, GroupState& st, int lo, int hi) {
    const int E = num_experts, n = st.num_groups();
    double total = 0;
    for (size_t i = 0; i < static_cast<size_t>(E) * E; ++i) total += a[i];
    const double tol = 1e-12 * std::max(total, 1e-300);
    constexpr int kMaxPasses = 200;  // U rises strictly each step; the cap only bounds pathological inputs
    for (int pass = 0; pass < kMaxPasses; ++pass) {
        bool improved = false;
        for (int e = 0; e < E; ++e) {
            const int g = st.group(e);
            double best_gain = tol;
            int best_h = -1, best_f = -1;
            // Moves e: g -> h.
            if (st.size(g) > lo) {
                for (int h = 0; h < n; ++h) {
                    if (h == g || st.size(h) >= hi) continue;
                    const double gain = st.aff(e, h) - st.aff(e, g);
                    if (gain > best_gain) {
                        best_gain = gain;
                        best_h = h;
                        best_f = -1;
                    }
                }
            }
            // Swaps e <-> f (sizes unchanged).
            const double* row = a + static_cast<size_t>(e) * E;
            const double keep_e = st.aff(e, g);
            for (int f = 0; f < E; ++f) {
                const int h = st.group(f);
                if (h == g) continue;
                const double gain = st.aff(e, h) - keep_e + st.aff(f, g) - st.aff(f, h) - 2 * row[f];
                if (gain > best_gain) {
                    best_gain = gain;
                    best_h = h;
                    best_f = f;
                }
            }
            if (best_h < 0) continue;
            st.move(e, best_h);
            if (best_f >= 0) st.move(best_f, g);
            improved = true;
        }
        if (!improved) break;
    }
}

}  // namespace detail

double affinity_utilization(const std::vector<double>& affinity, int num_experts, const Grouping& grouping) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "affinity_utilization");
    GRACE_CHECK_ARG(static_cast<int>(grouping.group_of.size()) == num_experts, "affinity_utilization: grouping has ",
                    grouping.group_of.size(), " experts, expected ", num_experts);
    for (int g : grouping.group_of) {
        GRACE_CHECK_ARG(g >= 0 && g < grouping.num_groups, "affinity_utilization: group id ", g, " outside [0, ",
                        grouping.num_groups, ")");
    }
    double intra = 0, total = 0;
    const size_t E = num_experts;
    for (size_t i = 0; i < E; ++i) {
        for (size_t j = i + 1; j < E; ++j) {
            total += a[i * E + j];
            if (grouping.group_of[i] == grouping.group_of[j]) intra += a[i * E + j];
        }
    }
    return total > 0 ? intra / total : 1.0;
}

double size_deviation(const Grouping& grouping) {
    const int E = static_cast<int>(grouping.group_of.size());
    GRACE_CHECK_ARG(grouping.num_groups >= 1 && E >= 1,
                    "size_deviation: empty grouping (num_groups = ", grouping.num_groups, ", experts = ", E, ")");
    const std::vector<int> s = grouping.sizes();
    const auto [mn, mx] = std::minmax_element(s.begin(), s.end());
    return (*mx - *mn) / (static_cast<double>(E) / grouping.num_groups);
}

std::pair<int, int> controlled_bounds(int num_experts, int num_groups, double r, int cap) {
    detail::check_num_groups(num_experts, num_groups, "controlled_bounds");
    GRACE_CHECK_ARG(std::isfinite(r) && r >= 0, "controlled_bounds: r must be finite and >= 0, got ", r);
    GRACE_CHECK_ARG(cap >= 0, "controlled_bounds: cap must be >= 0 (0 = none), got ", cap);
    const double s = static_cast<double>(num_experts) / num_groups;
    // The tolerance keeps (1 + 0.1) * 10 = 11.000000000000002 from becoming 12.
    constexpr double kTol = 1e-9;
    const int lo = std::max(1, static_cast<int>(std::floor((1 - r) * s + kTol)));
    int hi = static_cast<int>(std::ceil((1 + r) * s - kTol));
    if (cap > 0) hi = std::min(hi, cap);
    return {lo, hi};
}

namespace {

void check_start(const Grouping& start, int num_experts, const char* fn) {
    GRACE_CHECK_ARG(static_cast<int>(start.group_of.size()) == num_experts, fn, ": start grouping has ",
                    start.group_of.size(), " experts, expected ", num_experts);
    detail::check_num_groups(num_experts, start.num_groups, fn);
    for (int g : start.group_of) {
        GRACE_CHECK_ARG(g >= 0 && g < start.num_groups, fn, ": group id ", g, " outside [0, ", start.num_groups, ")");
    }
}

void check_bounds(int num_experts, int n, int lo, int hi, const char* fn) {
    GRACE_CHECK_ARG(lo >= 0 && hi >= lo, fn, ": size bounds [", lo, ", ", hi, "] are not a valid range");
    GRACE_CHECK_ARG(static_cast<long long>(n) * lo <= num_experts, fn, ": infeasible bounds: ", n, " groups of >= ", lo,
                    " experts need more than E = ", num_experts);
    GRACE_CHECK_ARG(static_cast<long long>(n) * hi >= num_experts, fn, ": infeasible bounds: ", n, " groups of <= ", hi,
                    " experts cannot hold E = ", num_experts);
}

Grouping controlled_clean(const std::vector<double>& a, int E, const Grouping& start, int lo, int hi, bool refine) {
    detail::GroupState st(a.data(), E, start);
    detail::repair_sizes(st, lo, hi);
    if (refine) detail::refine_groups(a.data(), E, st, lo, hi);
    return st.grouping();
}

}  // namespace

Grouping controlled_grouping(const std::vector<double>& affinity, int num_experts, const Grouping& start, int lo,
                             int hi, bool refine) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "controlled_grouping");
    check_start(start, num_experts, "controlled_grouping");
    check_bounds(num_experts, start.num_groups, lo, hi, "controlled_grouping");
    return controlled_clean(a, num_experts, start, lo, hi, refine);
}

KneeResult knee_grouping(const std::vector<double>& affinity, int num_experts, const Grouping& fully_non_uniform,
                         int cap, bool refine, bool allow_single) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "knee_grouping");
    check_start(fully_non_uniform, num_experts, "knee_grouping");
    const int E = num_experts, n = fully_non_uniform.num_groups;
    GRACE_CHECK_ARG(cap >= 0, "knee_grouping: cap must be >= 0 (0 = none), got ", cap);
    GRACE_CHECK_ARG(cap == 0 || static_cast<long long>(cap) * n >= E, "knee_grouping: infeasible cap: ", n,
                    " groups of <= ", cap, " experts cannot hold E = ", E);
    const double s = static_cast<double>(E) / n;
    const std::vector<int> sizes = fully_non_uniform.sizes();
    const int min_size = std::max(1, *std::min_element(sizes.begin(), sizes.end()));
    const int max_size = *std::max_element(sizes.begin(), sizes.end());
    const int hi_limit = E - (n - 1);  // no group can exceed it while all are non-empty

    // Candidate r: every value at which (1 - r) s or (1 + r) s is an integer, i.e. where lo or hi takes a new
    // value; keep those whose effective bounds differ from the previous point, and stop at the first one the
    // fully non-uniform grouping fits (or when the bounds stop changing).
    std::vector<double> cand{0.0};
    for (int k = static_cast<int>(std::floor(s)); k >= 1; --k) {
        if (k < s) cand.push_back((s - k) / s);
    }
    for (int k = static_cast<int>(std::ceil(s)); k <= E; ++k) {
        if (k > s) cand.push_back((k - s) / s);
    }
    std::sort(cand.begin(), cand.end());
    std::vector<double> grid;
    std::vector<std::pair<int, int>> bounds;
    for (double r : cand) {
        auto [lo, hi] = controlled_bounds(E, n, r, cap);
        hi = std::min(hi, hi_limit);
        if (!bounds.empty() && bounds.back() == std::make_pair(lo, hi)) continue;
        grid.push_back(r);
        bounds.emplace_back(lo, hi);
        if (lo <= min_size && max_size <= hi) break;
    }
    GRACE_CHECK_ARG(allow_single || grid.size() > 1, "knee_grouping: the r grid has a single point (r = 0: the ",
                    "fully non-uniform grouping already fits the uniform bounds [", bounds[0].first, ", ",
                    bounds[0].second, "]), so there is no knee to choose; pass allow_single = true to accept it");

    double total = 0;
    for (int i = 0; i < E; ++i)
        for (int j = i + 1; j < E; ++j) total += a[static_cast<size_t>(i) * E + j];

    KneeResult res;
    std::vector<Grouping> groupings;
    groupings.reserve(grid.size());
    const detail::GroupState base(a.data(), E, fully_non_uniform);  // O(E^2) once; each point copies O(E n)
    for (size_t p = 0; p < grid.size(); ++p) {
        detail::GroupState st = base;
        detail::repair_sizes(st, bounds[p].first, bounds[p].second);
        if (refine) detail::refine_groups(a.data(), E, st, bounds[p].first, bounds[p].second);
        groupings.push_back(st.grouping());
        const double u = total > 0 ? st.intra_sum() / total : 1.0;
        res.curve.push_back(KneePoint{grid[p], u, size_deviation(groupings.back())});
    }
    // Kneedle: normalize D (x) and U (y) to [0, 1], farthest point from the chord first -> last.
    double dmin = res.curve[0].d, dmax = dmin, umin = res.curve[0].u, umax = umin;
    for (const KneePoint& k : res.curve) {
        dmin = std::min(dmin, k.d);
        dmax = std::max(dmax, k.d);
        umin = std::min(umin, k.u);
        umax = std::max(umax, k.u);
    }
    auto nx = [&](double d) { return dmax > dmin ? (d - dmin) / (dmax - dmin) : 0.0; };
    auto ny = [&](double u) { return umax > umin ? (u - umin) / (umax - umin) : 0.0; };
    const double x0 = nx(res.curve.front().d), y0 = ny(res.curve.front().u);
    const double x1 = nx(res.curve.back().d), y1 = ny(res.curve.back().u);
    const double len = std::hypot(x1 - x0, y1 - y0);
    size_t best = 0;
    double best_dist = -1;
    for (size_t p = 0; p < res.curve.size(); ++p) {
        const double x = nx(res.curve[p].d), y = ny(res.curve[p].u);
        const double dist =
            len > 0 ? std::abs((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / len : std::hypot(x - x0, y - y0);
        if (dist > best_dist + 1e-12) {  // ties go to the smaller r
            best_dist = dist;
            best = p;
        }
    }
    res.r_star = res.curve[best].r;
    res.grouping = std::move(groupings[best]);
    return res;
}

}  // namespace grace
