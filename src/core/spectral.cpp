/// @file spectral.cpp
/// Fully non-uniform grouping by Ng-Jordan-Weiss spectral clustering (spec §3): the eigenvectors of the n
/// smallest eigenvalues of L_sym, rows normalized, clustered by k-means (k-means++ seeding, restarts).
///
/// Eigenvector ambiguity: an eigenvector's sign, and the basis of a repeated eigenvalue's eigenspace, are not
/// unique. Neither is canonicalized, because the embedding only enters k-means through squared distances: a sign
/// flip of a column leaves every (x - y)^2 bit-identical, and a rotation inside an eigenspace leaves the
/// distances equal up to rounding. Groups are relabelled canonically (detail::canonical) afterwards.

// Eigen's own OpenMP parallelism would make the planner's per-layer threads oversubscribe the cores.
#define EIGEN_DONT_PARALLELIZE
#include <Spectra/MatOp/DenseSymMatProd.h>
#include <Spectra/SymEigsSolver.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>

#include "grace/error.hpp"
#include "grace/grouping.hpp"
#include "grouping_internal.hpp"

namespace grace {
namespace {

// Partial (Lanczos) eigensolver settings; the thresholds come from BM_TopEigenvectors in bench/bm_grouping.cpp.
constexpr int kLanczosMinExperts = 64;  // below: the dense solver
constexpr int kLanczosMaxFraction = 8;  // use Lanczos only for k <= E / 8 eigenvectors
constexpr int kLanczosMinBasis = 24;    // Krylov basis size at least this (and >= 2k + 1)
constexpr int kLanczosMaxRestarts = 1000;
constexpr double kLanczosTolerance = 1e-10;

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

/// Number of eigenvalues of the symmetric tridiagonal (d, e) below x (Sturm sequence).
int sturm_count(const Eigen::VectorXd& d, const Eigen::VectorXd& e, double x) {
    const int m = static_cast<int>(d.size());
    int count = 0;
    double q = d(0) - x;
    for (int i = 0;;) {
        if (q < 0) ++count;
        if (++i == m) break;
        if (q == 0) q = std::numeric_limits<double>::min();
        q = d(i) - x - e(i - 1) * e(i - 1) / q;
    }
    return count;
}

/// The `k` largest eigenpairs of the symmetric matrix `m`, eigenvector columns in descending eigenvalue order.
/// Only k vectors are needed, so instead of a full eigendecomposition (whose Givens accumulation dominates,
/// ~4x the cost) we tridiagonalize, find the k eigenvalues by bisection, get their vectors by inverse iteration
/// on the tridiagonal matrix (re-orthogonalized inside clusters of close eigenvalues, as LAPACK's dstein), and
/// transform back with the Householder reflectors.
Eigen::MatrixXd dense_top_eigenvectors(const Eigen::MatrixXd& m, int k) {
    const int n = static_cast<int>(m.rows());
    Eigen::Tridiagonalization<Eigen::MatrixXd> tri(m);
    const Eigen::VectorXd d = tri.diagonal();
    const Eigen::VectorXd e = tri.subDiagonal();
    double gl = d(0), gu = d(0), norm = 0;
    for (int i = 0; i < n; ++i) {
        const double r = (i > 0 ? std::abs(e(i - 1)) : 0.0) + (i + 1 < n ? std::abs(e(i)) : 0.0);
        gl = std::min(gl, d(i) - r);
        gu = std::max(gu, d(i) + r);
        norm = std::max(norm, std::abs(d(i)) + r);
    }
    const double eps = std::numeric_limits<double>::epsilon();
    std::vector<double> lambda(k);
    for (int j = 0; j < k; ++j) {  // the (n-1-j)-th smallest eigenvalue
        const int idx = n - 1 - j;
        double lo = gl - eps * norm, hi = gu + eps * norm;
        for (int it = 0; it < 200 && hi - lo > 2 * eps * std::max(std::abs(lo), std::abs(hi)) + 1e-300; ++it) {
            const double mid = 0.5 * (lo + hi);
            if (mid <= lo || mid >= hi) break;
            if (sturm_count(d, e, mid) > idx)
                hi = mid;
            else
                lo = mid;
        }
        lambda[j] = 0.5 * (lo + hi);
    }
    // Inverse iteration on T - lambda I (LU with partial pivoting), deterministic start vectors.
    Eigen::MatrixXd x(n, k);
    const double ortol = 1e-3 * std::max(norm, 1e-300), pertol = 10 * eps * std::max(norm, 1e-300);
    std::vector<double> a(n), b(n), rhs(n);
    std::vector<char> swapped(n);
    int cluster_start = 0;
    double prev_shift = 0;
    detail::SplitMix64 rng(0x5EC7A1ULL);
    for (int j = 0; j < k; ++j) {
        double shift = lambda[j];
        if (j > 0 && std::abs(lambda[j] - lambda[j - 1]) < ortol) {
            if (shift >= prev_shift - pertol) shift = prev_shift - pertol;  // distinct shifts inside a cluster
        } else {
            cluster_start = j;
        }
        prev_shift = shift;
        // Factor T - shift I = P L U (U has two super-diagonals).
        for (int i = 0; i < n; ++i) {
            a[i] = d(i) - shift;
            b[i] = i + 1 < n ? e(i) : 0.0;  // super-diagonal
        }
        std::vector<double> l(n, 0.0);
        std::vector<double> u0(n), u1(n, 0.0), u2(n, 0.0);
        double diag = a[0], up1 = b[0], up2 = 0;
        for (int i = 0; i < n; ++i) {
            if (i + 1 < n) {
                const double sub = e(i);  // T(i+1, i)
                double next_diag = a[i + 1], next_up1 = i + 2 < n ? b[i + 1] : 0.0;
                if (std::abs(sub) > std::abs(diag)) {  // swap rows i and i+1
                    swapped[i] = 1;
                    const double mult = diag / sub;
                    u0[i] = sub;
                    u1[i] = next_diag;
                    u2[i] = next_up1;
                    l[i] = mult;
                    diag = up1 - mult * next_diag;
                    up1 = up2 - mult * next_up1;
                    up2 = 0;
                } else {
                    swapped[i] = 0;
                    if (diag == 0) diag = pertol;
                    const double mult = sub / diag;
                    u0[i] = diag;
                    u1[i] = up1;
                    u2[i] = up2;
                    l[i] = mult;
                    diag = next_diag - mult * up1;
                    up1 = next_up1 - mult * up2;
                    up2 = 0;
                }
            } else {
                u0[i] = diag == 0 ? pertol : diag;
            }
        }
        for (int i = 0; i < n; ++i) rhs[i] = rng.uniform() - 0.5;
        for (int iter = 0; iter < 4; ++iter) {
            // Solve L: apply the row swaps and multipliers.
            for (int i = 0; i + 1 < n; ++i) {
                if (swapped[i]) std::swap(rhs[i], rhs[i + 1]);
                rhs[i + 1] -= l[i] * rhs[i];
            }
            // Solve U.
            for (int i = n - 1; i >= 0; --i) {
                double v = rhs[i];
                if (i + 1 < n) v -= u1[i] * rhs[i + 1];
                if (i + 2 < n) v -= u2[i] * rhs[i + 2];
                const double piv = std::abs(u0[i]) < pertol ? (u0[i] < 0 ? -pertol : pertol) : u0[i];
                rhs[i] = v / piv;
            }
            for (int p = cluster_start; p < j; ++p) {  // re-orthogonalize against the cluster
                double dot = 0;
                for (int i = 0; i < n; ++i) dot += rhs[i] * x(i, p);
                for (int i = 0; i < n; ++i) rhs[i] -= dot * x(i, p);
            }
            double nrm = 0;
            for (double v : rhs) nrm += v * v;
            nrm = std::sqrt(nrm);
            GRACE_ASSERT(nrm > 0 && std::isfinite(nrm));
            for (double& v : rhs) v /= nrm;
        }
        for (int i = 0; i < n; ++i) x(i, j) = rhs[i];
    }
    return tri.matrixQ() * x;
}

/// The `k` largest eigenpairs by implicitly restarted Lanczos (Spectra): O(E^2) per matrix-vector product
/// instead of the O(E^3) tridiagonalization. Deterministic: a fixed start vector, single-threaded. Returns false
/// if it does not converge (the caller then uses the dense solver).
bool lanczos_top_eigenvectors(const Eigen::MatrixXd& m, int k, Eigen::MatrixXd& out) {
    const int n = static_cast<int>(m.rows());
    const int ncv = std::min(n, std::max(2 * k + 1, kLanczosMinBasis));  // Spectra needs k < ncv <= n
    Spectra::DenseSymMatProd<double> op(m);
    Spectra::SymEigsSolver<Spectra::DenseSymMatProd<double>> solver(op, k, ncv);
    // Not the constant vector: that is close to the top eigenvector D^1/2 1 and would slow the first restarts.
    std::vector<double> start(n);
    detail::SplitMix64 rng(0x1A2C05ULL);
    for (double& v : start) v = rng.uniform() - 0.5;
    solver.init(start.data());
    solver.compute(Spectra::SortRule::LargestAlge, kLanczosMaxRestarts, kLanczosTolerance,
                   Spectra::SortRule::LargestAlge);
    if (solver.info() != Spectra::CompInfo::Successful) return false;
    out = solver.eigenvectors(k);
    return out.cols() == k;
}

/// Eigenvectors of the `k` largest eigenvalues of the symmetric `m`, columns in descending eigenvalue order.
/// Lanczos pays off once E is large and k a small fraction of it (bench/bm_grouping.cpp, BM_TopEigenvectors);
/// below that the dense path is as fast and exact to rounding.
Eigen::MatrixXd top_eigenvectors(const Eigen::MatrixXd& m, int k, detail::EigenSolver solver) {
    const int n = static_cast<int>(m.rows());
    if (solver == detail::EigenSolver::kAuto)
        solver = n >= kLanczosMinExperts && k * kLanczosMaxFraction <= n ? detail::EigenSolver::kLanczos
                                                                         : detail::EigenSolver::kDense;
    Eigen::MatrixXd vec;
    if (solver == detail::EigenSolver::kLanczos && lanczos_top_eigenvectors(m, k, vec)) return vec;
    return dense_top_eigenvectors(m, k);
}

}  // namespace

namespace detail {

std::vector<double> top_eigenvectors(const std::vector<double>& m, int num_experts, int k, EigenSolver solver) {
    const int E = num_experts;
    GRACE_CHECK_ARG(E >= 2 && k >= 1 && k < E && m.size() == static_cast<size_t>(E) * E,
                    "top_eigenvectors: need 1 <= k < E and an E x E matrix, got k = ", k, ", E = ", E, ", ", m.size(),
                    " entries");
    const Eigen::MatrixXd mat =
        Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(m.data(), E, E);
    const Eigen::MatrixXd vec = grace::top_eigenvectors(mat, k, solver);
    std::vector<double> out(static_cast<size_t>(E) * k);
    for (int i = 0; i < E; ++i)
        for (int c = 0; c < k; ++c) out[static_cast<size_t>(i) * k + c] = vec(i, c);
    return out;
}

Grouping spectral_grouping(const std::vector<double>& affinity, int num_experts, int num_groups,
                           const SpectralOptions& options, int min_size, int max_size, EigenSolver solver) {
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
    GRACE_CHECK_ARG(min_size >= 0 && max_size >= 0,
                    "spectral_grouping: size bounds must be >= 0, got min_size = ", min_size,
                    ", max_size = ", max_size);
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
        // Filled column by column (Eigen's storage order) from row j of `a`: equal to a(i, j), as clean
        // affinity is exactly symmetric, and several times faster than strided writes.
        Eigen::MatrixXd w(E, E);
        for (int j = 0; j < E; ++j) {
            const double* row = &a[static_cast<size_t>(j) * E];
            double* col = w.col(j).data();
            for (int i = 0; i < E; ++i) col[i] = row[i] + eps;
            col[j] = 0.0;
        }
        Eigen::VectorXd dinv = w.rowwise().sum();
        for (int i = 0; i < E; ++i) dinv(i) = dinv(i) > 0 ? 1.0 / std::sqrt(dinv(i)) : 0.0;
        // The n smallest eigenvalues of L_sym = I - D^-1/2 W D^-1/2 are the n largest of D^-1/2 W D^-1/2.
        const Eigen::MatrixXd m = dinv.asDiagonal() * w * dinv.asDiagonal();
        const Eigen::MatrixXd vec = grace::top_eigenvectors(m, n, solver);
        std::vector<double> pts(static_cast<size_t>(E) * n);
        for (int i = 0; i < E; ++i) {
            double norm = 0;
            for (int c = 0; c < n; ++c) {
                const double v = vec(i, c);
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

}  // namespace detail

Grouping spectral_grouping(const std::vector<double>& affinity, int num_experts, int num_groups,
                           const SpectralOptions& options, int min_size, int max_size) {
    return detail::spectral_grouping(affinity, num_experts, num_groups, options, min_size, max_size,
                                     detail::EigenSolver::kAuto);
}

}  // namespace grace
