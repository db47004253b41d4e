/// @file spectral.cpp
/// Fully non-uniform grouping by Ng-Jordan-Weiss spectral clustering (spec §3): the eigenvectors of the n
/// smallest eigenvalues of L_sym, rows normalized, clustered by k-means (k-means++ seeding, restarts).

// Eigen's own OpenMP parallelism would make the planner's per-layer threads oversubscribe the cores.
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>

#include "grace/error.hpp"
#include "grace/grouping.hpp"
#include "grouping_internal.hpp"

namespace grace {
namespace {

double sq_dist(const double* x, const double* y, int d) {
    double s = 0;
    for (int k = 0; k < d; ++k) {
        const double t = x[k] - y[k];
        s += t * t;
    }
    return s;
}

/// One k-means run (k-means++ seeding, then Lloyd); returns the inertia and fills `label`.
double kmeans_once(const std::vector<double>& pts, int m, int d, int k, int max_iters, detail::SplitMix64& rng,
                   std::vector<int>& label) {
    std::vector<double> ctr(static_cast<size_t>(k) * d), dist(m, std::numeric_limits<double>::infinity());
    std::vector<char> is_center(m, 0);
    auto set_center = [&](int c, int p) {
        std::copy_n(&pts[static_cast<size_t>(p) * d], d, &ctr[static_cast<size_t>(c) * d]);
        is_center[p] = 1;
        for (int i = 0; i < m; ++i) dist[i] = std::min(dist[i], sq_dist(&pts[i * size_t(d)], &ctr[c * size_t(d)], d));
    };
    set_center(0, static_cast<int>(rng.next() % static_cast<uint64_t>(m)));
    for (int c = 1; c < k; ++c) {
        double sum = 0;
        for (int i = 0; i < m; ++i) sum += dist[i];
        int pick = -1;
        if (sum > 0) {
            const double r = rng.uniform() * sum;
            double acc = 0;
            for (int i = 0; i < m; ++i) {
                acc += dist[i];
                if (dist[i] > 0 && acc > r) {
                    pick = i;
                    break;
                }
            }
            if (pick < 0) {  // rounding at the end of the cumulative sum: the last point with mass
                for (int i = m - 1; i >= 0 && pick < 0; --i)
                    if (dist[i] > 0) pick = i;
            }
        } else {  // every point sits on a center: the first point not yet used
            for (int i = 0; i < m && pick < 0; ++i)
                if (!is_center[i]) pick = i;
        }
        set_center(c, pick);
    }

    label.assign(m, -1);
    std::vector<int> count(k);
    std::vector<double> pd(m);
    for (int it = 0; it < max_iters; ++it) {
        bool changed = false;
        std::fill(count.begin(), count.end(), 0);
        for (int i = 0; i < m; ++i) {
            int best = 0;
            double bd = sq_dist(&pts[i * size_t(d)], &ctr[0], d);
            for (int c = 1; c < k; ++c) {
                const double t = sq_dist(&pts[i * size_t(d)], &ctr[c * size_t(d)], d);
                if (t < bd) {
                    bd = t;
                    best = c;
                }
            }
            changed |= label[i] != best;
            label[i] = best;
            pd[i] = bd;
            ++count[best];
        }
        // An empty cluster is re-seeded at the point farthest from its center (among clusters that can spare one).
        for (int c = 0; c < k; ++c) {
            if (count[c] > 0) continue;
            int far = -1;
            for (int i = 0; i < m; ++i) {
                if (count[label[i]] > 1 && (far < 0 || pd[i] > pd[far])) far = i;
            }
            GRACE_ASSERT(far >= 0);
            --count[label[far]];
            label[far] = c;
            count[c] = 1;
            pd[far] = 0;
            changed = true;
        }
        std::fill(ctr.begin(), ctr.end(), 0.0);
        for (int i = 0; i < m; ++i)
            for (int t = 0; t < d; ++t) ctr[label[i] * size_t(d) + t] += pts[i * size_t(d) + t];
        for (int c = 0; c < k; ++c)
            for (int t = 0; t < d; ++t) ctr[c * size_t(d) + t] /= count[c];
        if (!changed) break;
    }
    double inertia = 0;
    for (int i = 0; i < m; ++i) inertia += sq_dist(&pts[i * size_t(d)], &ctr[label[i] * size_t(d)], d);
    return inertia;
}

}  // namespace

Grouping spectral_grouping(const std::vector<double>& affinity, int num_experts, int num_groups,
                           const SpectralOptions& options, int min_size, int max_size) {
    const std::vector<double> a = detail::clean_affinity(affinity, num_experts, "spectral_grouping");
    detail::check_num_groups(num_experts, num_groups, "spectral_grouping");
    GRACE_CHECK_ARG(options.kmeans_restarts >= 1, "spectral_grouping: kmeans_restarts must be >= 1, got ",
                    options.kmeans_restarts);
    GRACE_CHECK_ARG(options.kmeans_max_iters >= 1, "spectral_grouping: kmeans_max_iters must be >= 1, got ",
                    options.kmeans_max_iters);
    GRACE_CHECK_ARG(std::isfinite(options.eps_scale) && options.eps_scale >= 0,
                    "spectral_grouping: eps_scale must be finite and >= 0, got ", options.eps_scale);
    const int E = num_experts, n = num_groups;
    const int hi = max_size > 0 ? max_size : E;
    GRACE_CHECK_ARG(min_size >= 0 && max_size >= 0, "spectral_grouping: size bounds must be >= 0, got min_size = ",
                    min_size, ", max_size = ", max_size);
    GRACE_CHECK_ARG(min_size <= hi, "spectral_grouping: min_size (", min_size, ") exceeds max_size (", hi, ")");
    GRACE_CHECK_ARG(static_cast<long long>(n) * min_size <= E, "spectral_grouping: infeasible bounds: ", n,
                    " groups of >= ", min_size, " experts need more than E = ", E);
    GRACE_CHECK_ARG(static_cast<long long>(n) * hi >= E, "spectral_grouping: infeasible bounds: ", n,
                    " groups of <= ", hi, " experts cannot hold E = ", E);

    Grouping g{n, std::vector<int>(E, 0)};
    if (n == E) {
        for (int e = 0; e < E; ++e) g.group_of[e] = e;
    } else if (n > 1) {
        double mean = 0;
        for (double x : a) mean += x;
        mean = E > 1 ? mean / (static_cast<double>(E) * (E - 1)) : 0.0;
        const double eps = mean > 0 ? options.eps_scale * mean : 1.0;  // no affinity at all: a uniform graph
        Eigen::MatrixXd w(E, E);
        for (int i = 0; i < E; ++i)
            for (int j = 0; j < E; ++j) w(i, j) = i == j ? 0.0 : a[static_cast<size_t>(i) * E + j] + eps;
        Eigen::VectorXd dinv = w.rowwise().sum();
        for (int i = 0; i < E; ++i) dinv(i) = dinv(i) > 0 ? 1.0 / std::sqrt(dinv(i)) : 0.0;
        // The n smallest eigenvalues of L_sym = I - D^-1/2 W D^-1/2 are the n largest of D^-1/2 W D^-1/2.
        const Eigen::MatrixXd m = dinv.asDiagonal() * w * dinv.asDiagonal();
        Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(m, Eigen::ComputeEigenvectors);
        GRACE_ASSERT(es.info() == Eigen::Success);
        std::vector<double> pts(static_cast<size_t>(E) * n);
        for (int i = 0; i < E; ++i) {
            double norm = 0;
            for (int c = 0; c < n; ++c) {
                const double v = es.eigenvectors()(i, E - 1 - c);
                pts[static_cast<size_t>(i) * n + c] = v;
                norm += v * v;
            }
            norm = std::sqrt(norm);
            if (norm > 0)
                for (int c = 0; c < n; ++c) pts[static_cast<size_t>(i) * n + c] /= norm;
        }
        detail::SplitMix64 rng(options.seed);
        std::vector<int> label, best_label;
        double best = std::numeric_limits<double>::infinity();
        for (int r = 0; r < options.kmeans_restarts; ++r) {
            const double inertia = kmeans_once(pts, E, n, n, options.kmeans_max_iters, rng, label);
            if (inertia < best) {  // strict: ties keep the earlier restart
                best = inertia;
                best_label = label;
            }
        }
        g.group_of = best_label;
    }
    g = detail::canonical(g);
    const std::vector<int> sizes = g.sizes();
    const auto [mn, mx] = std::minmax_element(sizes.begin(), sizes.end());
    if (*mn < min_size || *mx > hi) {
        detail::GroupState st(a.data(), E, g);
        detail::repair_sizes(st, min_size, hi);
        g = st.grouping();
    }
    return g;
}

}  // namespace grace
