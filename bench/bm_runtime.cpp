// Expert compute of the CPU runtime in GFLOP/s, side by side in one run with the bare GEMMs of the same shapes:
//   BM_ExpertForward   grace::expert_forward (SwiGLU: 3 Eigen GEMMs + silu*up; bf16 storage widened per call)
//   BM_EigenGemm       the same three GEMMs through Eigen alone (the ceiling of BM_ExpertForward)
//   BM_BlasSgemm       the same three GEMMs through the machine's BLAS (sgemm_, Debian libblas3)
// Shapes: OLMoE's expert (H=2048, I=1024) and Qwen3-30B-A3B's (H=2048, I=768), n token rows.
// FLOPs counted: 6*n*H*I (three GEMMs of 2*n*H*I). Counter "GFLOP/s" = FLOPs / wall time. One thread.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <vector>

#include "grace/experts.hpp"

#ifdef GRACE_HAVE_BLAS
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
#endif

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

grace::ExpertShape shape_of(const benchmark::State& state) {
    return {static_cast<int>(state.range(1)), static_cast<int>(state.range(2))};
}

std::vector<float> input(int64_t n, int H) {
    std::vector<float> x(static_cast<size_t>(n) * H);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.001f * static_cast<float>(i));
    return x;
}

void report(benchmark::State& state, grace::ExpertShape s, int64_t n) {
    state.counters["GFLOP/s"] = benchmark::Counter(
        grace::expert_flops(s, n) * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void BM_ExpertForward(benchmark::State& state) {
    grace::set_expert_threads(1);
    const auto s = shape_of(state);
    const int64_t n = state.range(0);
    const auto dtype = state.range(3) ? grace::DType::kBF16 : grace::DType::kF32;
    const auto w = grace::random_expert(1, 0, 0, s, dtype);
    const auto x = input(n, s.hidden);
    std::vector<float> y(x.size());
    grace::ExpertWorkspace ws;
    for (auto _ : state) {
        grace::expert_forward(w, x.data(), n, y.data(), ws);
        benchmark::DoNotOptimize(y.data());
    }
    state.SetLabel(dtype == grace::DType::kBF16 ? "bf16" : "fp32");
    report(state, s, n);
}

void BM_EigenGemm(benchmark::State& state) {
    Eigen::setNbThreads(1);
    const auto s = shape_of(state);
    const int64_t n = state.range(0);
    const int H = s.hidden, I = s.intermediate;
    RowMat X = RowMat::Random(n, H), Wg = RowMat::Random(I, H), Wu = RowMat::Random(I, H), Wd = RowMat::Random(H, I);
    RowMat G(n, I), U(n, I), Y(n, H);
    for (auto _ : state) {
        G.noalias() = X * Wg.transpose();
        U.noalias() = X * Wu.transpose();
        Y.noalias() = G * Wd.transpose();
        benchmark::DoNotOptimize(Y.data());
    }
    report(state, s, n);
}

#ifdef GRACE_HAVE_BLAS
void BM_BlasSgemm(benchmark::State& state) {
    const auto s = shape_of(state);
    const int n = static_cast<int>(state.range(0));
    const int H = s.hidden, I = s.intermediate;
    std::vector<float> X = input(n, H), Wg = input(I, H), Wu = input(I, H), Wd = input(H, I);
    std::vector<float> G(static_cast<size_t>(n) * I), U(G.size()), Y(static_cast<size_t>(n) * H);
    const float one = 1, zero = 0;
    // Row-major C[n, I] = X[n, H] * W[I, H]^T is column-major C^T[I, n] = W^T... : sgemm("T", "N", I, n, H, W, H, X,
    // H).
    for (auto _ : state) {
        sgemm_("T", "N", &I, &n, &H, &one, Wg.data(), &H, X.data(), &H, &zero, G.data(), &I);
        sgemm_("T", "N", &I, &n, &H, &one, Wu.data(), &H, X.data(), &H, &zero, U.data(), &I);
        sgemm_("T", "N", &H, &n, &I, &one, Wd.data(), &I, G.data(), &I, &zero, Y.data(), &H);
        benchmark::DoNotOptimize(Y.data());
    }
    report(state, s, n);
}
#endif

void shapes(benchmark::internal::Benchmark* b, bool with_dtype) {
    for (int64_t n : {16, 128, 512})
        for (auto [H, I] : {std::pair{2048, 1024}, std::pair{2048, 768}})
            for (int d = 0; d < (with_dtype ? 2 : 1); ++d) b->Args({n, H, I, d});
    b->ArgNames({"n", "H", "I", "bf16"})->Unit(benchmark::kMillisecond)->MinTime(0.3);
}

BENCHMARK(BM_ExpertForward)->Apply([](auto* b) { shapes(b, true); });
BENCHMARK(BM_EigenGemm)->Apply([](auto* b) { shapes(b, false); });
#ifdef GRACE_HAVE_BLAS
BENCHMARK(BM_BlasSgemm)->Apply([](auto* b) { shapes(b, false); });
#endif

}  // namespace

BENCHMARK_MAIN();
