// GPU MoE benchmark (run on the device by bench/cuda/run_device.sh): ceilings (copy bandwidth, dense bf16 GEMM),
// then per shape and token count the local layer (route + permute + experts + unpermute) with both GEMM
// backends, its stages, the expert GEMMs against a dense GEMM of the same FLOPs, and the per-expert time
// table f(n). Timing: CUDA events, warm-up first, median of repeats. Inputs are random (never zeros).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "grace/cuda_moe.hpp"
#include "grouped_gemm_sm90.hpp"

using namespace grace::cuda;
using bf16 = __nv_bfloat16;

namespace {

__global__ void fill_random(bf16* p, size_t n, uint64_t seed, float scale) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        uint64_t z = seed + i * 0x9e3779b97f4a7c15ULL;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        const float u = float(z >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
        p[i] = __float2bfloat16(u * scale);
    }
}

void fill(bf16* p, size_t n, uint64_t seed, float scale) {
    fill_random<<<1024, 256>>>(p, n, seed, scale);
    CUDA_LAUNCH_CHECK();
}

struct Events {
    cudaEvent_t a, b;
    Events() {
        CUDA_RUNTIME_CHECK(cudaEventCreate(&a));
        CUDA_RUNTIME_CHECK(cudaEventCreate(&b));
    }
    ~Events() { cudaEventDestroy(a), cudaEventDestroy(b); }
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

// Median over `iters` samples of (time of `reps` back-to-back calls) / reps, in ms.
double time_ms(const std::function<void()>& f, int warmup, int iters, int reps = 1) {
    Events ev;
    for (int i = 0; i < warmup; ++i) f();
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    std::vector<double> s;
    for (int i = 0; i < iters; ++i) {
        CUDA_RUNTIME_CHECK(cudaEventRecord(ev.a));
        for (int r = 0; r < reps; ++r) f();
        CUDA_RUNTIME_CHECK(cudaEventRecord(ev.b));
        CUDA_RUNTIME_CHECK(cudaEventSynchronize(ev.b));
        float ms = 0;
        CUDA_RUNTIME_CHECK(cudaEventElapsedTime(&ms, ev.a, ev.b));
        s.push_back(ms / reps);
    }
    return median(s);
}

// Row-major C[n, M] = X[n, K] @ W[M, K]^T (TN in cuBLAS's column-major terms).
void gemm_tn(cublasHandle_t h, int M, int n, int K, const bf16* W, const bf16* X, bf16* C) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, n, K, &one, W, CUDA_R_16BF, K, X, CUDA_R_16BF, K, &zero, C,
                              CUDA_R_16BF, M, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct Shape {
    std::string name;
    int E, k, H, I;
    double zipf_s;  // popularity ~ 1/(rank+1)^s: busiest expert ~3.5-4x the mean at these k/E
};

std::string get_arg(int argc, char** argv, const std::string& key, const std::string& def) {
    for (int i = 1; i + 1 < argc; ++i)
        if (argv[i] == key) return argv[i + 1];
    return def;
}

}  // namespace

int main(int argc, char** argv) try {
    const std::string out_dir = get_arg(argc, argv, "--out", ".");
    const std::string routing_dir = get_arg(argc, argv, "--routing-dir", "/tmp");
    const int iters = std::stoi(get_arg(argc, argv, "--iters", "15"));
    const std::vector<int> token_counts = {512, 2048, 8192, 16384};
    const int max_tokens = 16384;
    const std::vector<Shape> shapes = {{"olmoe", 64, 8, 2048, 1024, 0.5}, {"qwen3-30b-a3b", 128, 8, 2048, 768, 0.4}};

    cudaDeviceProp prop{};
    CUDA_RUNTIME_CHECK(cudaGetDeviceProperties(&prop, 0));
    cublasHandle_t cublas;
    CUBLAS_CHECK(cublasCreate(&cublas));
    std::ostringstream js;
    js.precision(6);
    std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);

    // Ceilings, measured here: a large device-to-device copy (bytes read + written) and a dense bf16 GEMM.
    double copy_gbps = 0, dense_peak_tflops = 0;
    {
        const size_t bytes = size_t(2) << 30;
        DeviceBuffer<char> a(bytes), b(bytes);
        CUDA_RUNTIME_CHECK(cudaMemset(a.data(), 1, bytes));
        const double ms = time_ms([&] { CUDA_RUNTIME_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice)); }, 3, 10);
        copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
        const int n = 8192;
        DeviceBuffer<bf16> A(size_t(n) * n), B(size_t(n) * n), C(size_t(n) * n);
        fill(A.data(), A.size(), 1, 1.f), fill(B.data(), B.size(), 2, 1.f);
        const double gms = time_ms([&] { gemm_tn(cublas, n, n, n, A.data(), B.data(), C.data()); }, 3, 10);
        dense_peak_tflops = 2.0 * n * n * double(n) / (gms * 1e-3) / 1e12;
    }
    std::printf("copy bandwidth (read+write): %.0f GB/s; dense bf16 GEMM 8192^3: %.0f TFLOP/s\n", copy_gbps,
                dense_peak_tflops);
    js << "{\"device\": {\"name\": \"" << prop.name << "\", \"sms\": " << prop.multiProcessorCount
       << ", \"copy_GBps\": " << copy_gbps << ", \"dense_gemm_8192_tflops\": " << dense_peak_tflops << "},\n \"shapes\": {";

    if (get_arg(argc, argv, "--threshold-sweep", "0") == "1") {
        // Expert GEMMs only (rerun_experts, no activation), side by side in one run: dense cuBLAS over all T*k
        // rows, the grouped call, the per-expert loop, and the hybrid at several row cut-offs.
        std::printf("\nthreshold sweep (expert GEMM ms, %% of dense same FLOPs)\n");
        std::ostringstream sj;
        sj << "{\"device\": \"" << prop.name << "\", \"copy_GBps\": " << copy_gbps << ", \"threshold_sweep\": [";
        bool first_row = true;
        for (const Shape& sh : shapes) {
            const int E = sh.E, k = sh.k, H = sh.H, I = sh.I;
            for (int T : {2048, 8192, 16384}) {
                DeviceBuffer<bf16> w13(size_t(E) * 2 * I * H), w2(size_t(E) * H * I), x(size_t(T) * H), out(size_t(T) * H);
                fill(w13.data(), w13.size(), 11, 1.f / std::sqrt(float(H)));
                fill(w2.data(), w2.size(), 12, 1.f / std::sqrt(float(I)));
                fill(x.data(), x.size(), 13, 1.f);
                std::mt19937_64 rng(1000 * E + T);  // the same routing as the main benchmark
                std::vector<int> perm(E);
                for (int e = 0; e < E; ++e) perm[e] = e;
                std::shuffle(perm.begin(), perm.end(), rng);
                std::uniform_real_distribution<double> u(1e-12, 1.0);
                std::vector<int32_t> idx(size_t(T) * k);
                std::vector<float> wts(size_t(T) * k);
                std::vector<std::pair<double, int>> g(E);
                for (int t = 0; t < T; ++t) {
                    for (int r = 0; r < E; ++r) g[r] = {-sh.zipf_s * std::log(r + 1.0) - std::log(-std::log(u(rng))), perm[r]};
                    std::partial_sort(g.begin(), g.begin() + k, g.end(), std::greater<>());
                    for (int j = 0; j < k; ++j) idx[size_t(t) * k + j] = g[j].second, wts[size_t(t) * k + j] = float(u(rng) + 0.1);
                }
                DeviceBuffer<int32_t> d_idx(idx.size());
                DeviceBuffer<float> d_w(wts.size());
                CUDA_RUNTIME_CHECK(cudaMemcpy(d_idx.data(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
                CUDA_RUNTIME_CHECK(cudaMemcpy(d_w.data(), wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
                const size_t nsel = size_t(T) * k;
                DeviceBuffer<bf16> dA(nsel * H), dC1(nsel * 2 * I), dC2(nsel * H);
                fill(dA.data(), dA.size(), 14, 1.f);
                const double flops = 2.0 * double(T) * k * (double(H) * 2 * I + double(I) * H);
                const double dense_ms = time_ms([&] {
                    gemm_tn(cublas, 2 * I, T * k, H, w13.data(), dA.data(), dC1.data());
                    gemm_tn(cublas, H, T * k, I, w2.data(), dC1.data(), dC2.data());
                }, 2, iters, 3);
                LocalMoe moe({E, k, H, I}, T, GroupedGemmBackend::kCublasGrouped);
                moe.set_weights(w13.data(), w2.data());
                moe.forward(x.data(), d_idx.data(), d_w.data(), out.data(), T, nullptr);
                std::printf("%-14s T=%5d dense %.3f ms (%.0f TF/s):", sh.name.c_str(), T, dense_ms, flops / dense_ms / 1e9);
                sj << (first_row ? "" : ",") << "\n  {\"shape\": \"" << sh.name << "\", \"T\": " << T
                   << ", \"dense_ms\": " << dense_ms;
                first_row = false;
                struct Variant { const char* name; GroupedGemmBackend b; int thr; };
                const Variant variants[] = {{"grouped", GroupedGemmBackend::kCublasGrouped, 0},
                                            {"loop", GroupedGemmBackend::kCublasLoop, 0},
                                            {"hybrid64", GroupedGemmBackend::kHybrid, 64},
                                            {"hybrid128", GroupedGemmBackend::kHybrid, 128},
                                            {"hybrid256", GroupedGemmBackend::kHybrid, 256},
                                            {"hybrid512", GroupedGemmBackend::kHybrid, 512},
                                            {"hybrid768", GroupedGemmBackend::kHybrid, 768},
                                            {"hybrid1024", GroupedGemmBackend::kHybrid, 1024},
                                            {"hybrid2048", GroupedGemmBackend::kHybrid, 2048},
                                            {"sm90", GroupedGemmBackend::kSm90, 0}};
                for (const Variant& v : variants) {
                    if (v.b == GroupedGemmBackend::kSm90 && !sm90_gemm_available()) continue;
                    moe.set_backend(v.b);
                    if (v.thr) moe.set_hybrid_threshold(v.thr);
                    const double ms = time_ms([&] { moe.rerun_experts(nullptr, false); }, 2, iters, 3);
                    std::printf(" %s %.3f (%.0f%%)", v.name, ms, 100 * dense_ms / ms);
                    sj << ", \"" << v.name << "_ms\": " << ms;
                }
                std::printf("\n");
                sj << "}";
            }
        }
        sj << "]}\n";
        std::ofstream(out_dir + "/threshold_sweep.json") << sj.str();
        cublasDestroy(cublas);
        return 0;
    }

    std::ostringstream table;  // h100-gemm-table.json
    table << "{\"device\": \"" << prop.name << "\",\n \"method\": \"cublasGemmEx bf16 (fp32 accumulate): gate+up [n,H]x[H,2I] then down [n,I]x[I,H] for one expert, weights rotated over 8 experts so they come from HBM; seconds: GPU time from a CUDA graph of 16 such pairs (median of 8 replays / 16); seconds_eager_launch: the same pairs issued back to back from the host (includes cuBLAS host cost, ~10 us/call); excludes SiLU*up and permutation; seconds_sm90_grouped (H100/H200 only): our sm90 grouped GEMM (SiLU*up fused) over E experts of n rows each in one launch pair (fewer experts when E*n > 2^21), GPU time divided by the experts, median of 7\",\n \"shapes\": {";

    std::printf("\n%-14s %6s %5s %-14s %9s %8s %8s %8s %8s %8s %8s %9s %7s %7s %7s\n", "shape", "T", "skew", "gemm",
                "layer_ms", "sort", "permute", "up", "act", "down", "unperm", "gemm_ms", "TF/s", "dense%", "perm%BW");
    bool first_shape = true;
    for (const Shape& sh : shapes) {
        const int E = sh.E, k = sh.k, H = sh.H, I = sh.I;
        DeviceBuffer<bf16> w13(size_t(E) * 2 * I * H), w2(size_t(E) * H * I), x(size_t(max_tokens) * H),
            out(size_t(max_tokens) * H);
        fill(w13.data(), w13.size(), 11, 1.f / std::sqrt(float(H)));
        fill(w2.data(), w2.size(), 12, 1.f / std::sqrt(float(I)));
        fill(x.data(), x.size(), 13, 1.f);
        LocalMoe moe({E, k, H, I}, max_tokens, GroupedGemmBackend::kCublasGrouped);
        moe.set_weights(w13.data(), w2.data());

        // 1x1 topology: every expert has one instance, on GPU 0 (the route stage still runs in full).
        RouteTable rt;
        rt.num_sources = 1, rt.num_experts = E, rt.period = 120;
        rt.sequence.assign(size_t(E) * 120, 0);
        for (int e = 0; e <= E; ++e) rt.instance_ptr.push_back(e);
        rt.instance_gpu.assign(E, 0);
        GpuReplicaRouter router(rt);
        const size_t nsel = size_t(max_tokens) * k;
        DeviceBuffer<int32_t> d_idx(nsel), r_inst(nsel), r_rank(nsel), r_per_rank(1), r_per_inst(E);
        DeviceBuffer<bool> r_in_rank(max_tokens);
        DeviceBuffer<float> d_w(nsel);
        // Dense reference buffers: the same two GEMMs over all T*k rows at once.
        DeviceBuffer<bf16> dA(nsel * H), dC1(nsel * 2 * I), dC2(nsel * H);
        fill(dA.data(), dA.size(), 14, 1.f), fill(dC1.data(), dC1.size(), 15, 1.f);

        js << (first_shape ? "" : ",") << "\n  \"" << sh.name << "\": {\"E\": " << E << ", \"k\": " << k
           << ", \"H\": " << H << ", \"I\": " << I << ", \"zipf_s\": " << sh.zipf_s << ", \"runs\": [";
        first_shape = false;
        for (size_t ti = 0; ti < token_counts.size(); ++ti) {
            const int T = token_counts[ti];
            // Skewed top-k without replacement (Gumbel top-k over log-popularity), seeded; popularity ranks are
            // a seeded permutation of the experts.
            std::mt19937_64 rng(1000 * E + T);
            std::vector<int> perm(E);
            for (int e = 0; e < E; ++e) perm[e] = e;
            std::shuffle(perm.begin(), perm.end(), rng);
            std::uniform_real_distribution<double> u(1e-12, 1.0);
            std::vector<int32_t> idx(size_t(T) * k);
            std::vector<float> wts(size_t(T) * k);
            std::vector<std::pair<double, int>> g(E);
            std::vector<int> counts(E, 0);
            for (int t = 0; t < T; ++t) {
                for (int r = 0; r < E; ++r) g[r] = {-sh.zipf_s * std::log(r + 1.0) - std::log(-std::log(u(rng))), perm[r]};
                std::partial_sort(g.begin(), g.begin() + k, g.end(), std::greater<>());
                double sum = 0;
                for (int j = 0; j < k; ++j) {
                    idx[size_t(t) * k + j] = g[j].second;
                    counts[g[j].second]++;
                    wts[size_t(t) * k + j] = float(u(rng) + 0.1);
                    sum += wts[size_t(t) * k + j];
                }
                for (int j = 0; j < k; ++j) wts[size_t(t) * k + j] = float(wts[size_t(t) * k + j] / sum);
            }
            const double skew = *std::max_element(counts.begin(), counts.end()) / (double(T) * k / E);
            {
                std::ofstream f(routing_dir + "/" + sh.name + "_T" + std::to_string(T) + ".i32", std::ios::binary);
                f.write(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
                std::ofstream fw(routing_dir + "/" + sh.name + "_T" + std::to_string(T) + ".f32", std::ios::binary);
                fw.write(reinterpret_cast<const char*>(wts.data()), wts.size() * 4);
            }
            CUDA_RUNTIME_CHECK(cudaMemcpy(d_idx.data(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
            CUDA_RUNTIME_CHECK(cudaMemcpy(d_w.data(), wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
            const RouteOutputs ro{r_inst.data(), r_rank.data(), r_per_rank.data(), r_in_rank.data(), r_per_inst.data()};
            const double flops = 2.0 * double(T) * k * (double(H) * 2 * I + double(I) * H);

            const double dense_ms = time_ms([&] {
                gemm_tn(cublas, 2 * I, T * k, H, w13.data(), dA.data(), dC1.data());
                gemm_tn(cublas, H, T * k, I, w2.data(), dC1.data(), dC2.data());
            }, 2, iters, 3);
            js << (ti ? "," : "") << "\n   {\"T\": " << T << ", \"max_over_mean\": " << skew
               << ", \"dense_same_flops_ms\": " << dense_ms << ", \"flops\": " << flops;
            // Our sm90 kernel four ways: the default (persistent, staged epilogue for the down GEMM only), every
            // epilogue direct (4 pipeline stages), every epilogue staged (3 stages), and one block per tile.
            using Ep = detail::Sm90Epilogue;
            struct Config { const char* name; GroupedGemmBackend backend; bool persistent; Ep epilogue; };
            std::vector<Config> configs = {{"cublas_grouped", GroupedGemmBackend::kCublasGrouped, true, Ep::kAuto},
                                           {"cublas_loop", GroupedGemmBackend::kCublasLoop, true, Ep::kAuto},
                                           {"hybrid", GroupedGemmBackend::kHybrid, true, Ep::kAuto}};
            if (sm90_gemm_available())
                configs.insert(configs.end(), {{"sm90", GroupedGemmBackend::kSm90, true, Ep::kAuto},
                                               {"sm90_direct", GroupedGemmBackend::kSm90, true, Ep::kDirect},
                                               {"sm90_staged", GroupedGemmBackend::kSm90, true, Ep::kStaged},
                                               {"sm90_block_per_tile", GroupedGemmBackend::kSm90, false, Ep::kAuto}});
            for (const Config& cfg : configs) {
                const GroupedGemmBackend backend = cfg.backend;
                const char* bname = cfg.name;
                detail::sm90_set_persistent(cfg.persistent);
                detail::sm90_set_epilogue(cfg.epilogue);
                moe.set_backend(backend);
                moe.set_profiling(false);
                const double layer_ms = time_ms([&] {
                    router.route(0, d_idx.data(), T, k, ro, nullptr);
                    moe.forward(x.data(), d_idx.data(), d_w.data(), out.data(), T, nullptr);
                }, 3, iters);
                const double route_ms = time_ms([&] { router.route(0, d_idx.data(), T, k, ro, nullptr); }, 3, iters, 5);
                moe.set_profiling(true);
                std::vector<double> st[7];
                for (int i = 0; i < iters; ++i) {
                    moe.forward(x.data(), d_idx.data(), d_w.data(), out.data(), T, nullptr);
                    const auto& tm = moe.last_timings();
                    const float v[7] = {tm.sort_ms, tm.permute_ms, tm.gemm_up_ms, tm.act_ms, tm.gemm_down_ms, tm.unpermute_ms, tm.total_ms};
                    for (int q = 0; q < 7; ++q) st[q].push_back(v[q]);
                }
                moe.set_profiling(false);
                double m[7];
                for (int q = 0; q < 7; ++q) m[q] = median(st[q]);
                const double gemm_ms = time_ms([&] { moe.rerun_experts(nullptr, false); }, 2, iters, 3);
                const double experts_ms = time_ms([&] { moe.rerun_experts(nullptr, true); }, 2, iters, 3);
                const double tflops = flops / (gemm_ms * 1e-3) / 1e12;
                const double perm_bytes = double(T) * k * H * 2 + double(T) * H * 2 + double(T) * k * 4;
                const double unperm_bytes = double(T) * k * H * 2 + double(T) * H * 2 + double(T) * k * 8;
                const double perm_gbps = perm_bytes / (m[1] * 1e-3) / 1e9, unperm_gbps = unperm_bytes / (m[5] * 1e-3) / 1e9;
                js << ", \"" << bname << "\": {\"layer_ms\": " << layer_ms << ", \"route_ms\": " << route_ms
                   << ", \"sort_ms\": " << m[0] << ", \"permute_ms\": " << m[1] << ", \"gemm_up_with_host_sync_ms\": " << m[2]
                   << ", \"act_ms\": " << m[3] << ", \"gemm_down_ms\": " << m[4] << ", \"unpermute_ms\": " << m[5]
                   << ", \"profiled_total_ms\": " << m[6] << ", \"expert_gemms_ms\": " << gemm_ms
                   << ", \"experts_with_act_ms\": " << experts_ms << ", \"gemm_tflops\": " << tflops
                   << ", \"fraction_of_dense\": " << dense_ms / gemm_ms << ", \"permute_GBps\": " << perm_gbps
                   << ", \"unpermute_GBps\": " << unperm_gbps << "}";
                std::printf("%-14s %6d %5.2f %-14s %9.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %9.3f %7.0f %6.0f%% %3.0f/%3.0f%%\n",
                            sh.name.c_str(), T, skew, bname,
                            layer_ms, m[0], m[1], m[2], m[3], m[4], m[5], gemm_ms, tflops, 100 * dense_ms / gemm_ms,
                            100 * perm_gbps / copy_gbps, 100 * unperm_gbps / copy_gbps);
            }
            detail::sm90_set_persistent(true);
            detail::sm90_set_epilogue(detail::Sm90Epilogue::kAuto);
            std::printf("%-14s %6d dense cuBLAS same FLOPs: %.3f ms = %.0f TF/s\n", sh.name.c_str(), T, dense_ms,
                        flops / (dense_ms * 1e-3) / 1e12);
            js << "}";
        }
        js << "]}";

        // f(n): one expert's two GEMMs for n tokens, on a sqrt(2) grid from 1 to 16384.
        std::vector<int> grid;
        for (double v = 1; v <= 16384.5; v *= std::sqrt(2.0)) {
            const int n = int(std::lround(v));
            if (grid.empty() || grid.back() != n) grid.push_back(n);
        }
        std::vector<double> secs, secs_eager;
        // The sm90 kernel's cost of one expert inside a grouped launch: one launch pair over E experts with n rows
        // each (fewer experts when E * n passes 2^21 rows), time / experts. (Alone, one small expert would fill
        // only a few SMs; in a layer the experts share the launch.)
        std::vector<double> secs_sm90;
        if (sm90_gemm_available()) {
            const int64_t cap = int64_t{1} << 21;
            DeviceBuffer<bf16> gx(size_t(cap) * H), gact(size_t(cap) * I), gy(size_t(cap) * H);
            fill(gx.data(), gx.size(), 16, 1.f);
            DeviceBuffer<int32_t> gseg(E + 1), gtiles(E + 1);
            for (int n : grid) {
                const int ne = int(std::min<int64_t>(E, cap / n));
                std::vector<int32_t> seg(E + 1);
                for (int e = 0; e <= E; ++e) seg[e] = std::min(e, ne) * n;
                CUDA_RUNTIME_CHECK(cudaMemcpy(gseg.data(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice));
                const double ms = time_ms([&] {
                    detail::sm90_tile_starts(gseg.data(), E, gtiles.data(), nullptr);
                    detail::sm90_gemm_up_swiglu(gx.data(), w13.data(), gact.data(), gseg.data(), gtiles.data(), E, H, I,
                                                cap, seg[E], nullptr);
                    detail::sm90_gemm_down(gact.data(), w2.data(), gy.data(), gseg.data(), gtiles.data(), E, H, I, cap,
                                           seg[E], nullptr);
                }, 2, 7, 1);
                secs_sm90.push_back(1e-3 * ms / ne);
            }
        }
        cudaStream_t cs;
        CUDA_RUNTIME_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
        const int reps = 16;
        for (int n : grid) {
            auto pair = [&](int e, cudaStream_t st) {
                CUBLAS_CHECK(cublasSetStream(cublas, st));
                gemm_tn(cublas, 2 * I, n, H, w13.data() + size_t(e) * 2 * I * H, dA.data(), dC1.data());
                gemm_tn(cublas, H, n, I, w2.data() + size_t(e) * H * I, dC1.data(), dC2.data());
            };
            int rot = 0;
            secs_eager.push_back(1e-3 * time_ms([&] { pair((rot++) % std::min(E, 8), nullptr); }, 3, 7, reps));
            // The same 16 pairs captured into one graph: GPU time without the host's per-call cost.
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            CUDA_RUNTIME_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
            for (int r = 0; r < reps; ++r) pair(r % std::min(E, 8), cs);
            CUDA_RUNTIME_CHECK(cudaStreamEndCapture(cs, &graph));
            CUDA_RUNTIME_CHECK(cudaGraphInstantiate(&exec, graph, 0));
            Events ev;
            std::vector<double> g;
            for (int i = 0; i < 10; ++i) {
                CUDA_RUNTIME_CHECK(cudaEventRecord(ev.a, cs));
                CUDA_RUNTIME_CHECK(cudaGraphLaunch(exec, cs));
                CUDA_RUNTIME_CHECK(cudaEventRecord(ev.b, cs));
                CUDA_RUNTIME_CHECK(cudaEventSynchronize(ev.b));
                float ms = 0;
                CUDA_RUNTIME_CHECK(cudaEventElapsedTime(&ms, ev.a, ev.b));
                if (i >= 2) g.push_back(ms / reps);
            }
            secs.push_back(1e-3 * median(g));
            cudaGraphExecDestroy(exec);
            cudaGraphDestroy(graph);
            CUBLAS_CHECK(cublasSetStream(cublas, nullptr));
        }
        cudaStreamDestroy(cs);
        table << (sh.name == "olmoe" ? "" : ",") << "\n  \"" << (sh.name == "olmoe" ? "olmoe" : "qwen3-30b-a3b")
              << "\": {\"hidden\": " << H << ", \"intermediate\": " << I << ", \"num_experts\": " << E
              << ", \"top_k\": " << k << ",\n   \"tokens\": [";
        for (size_t i = 0; i < grid.size(); ++i) table << (i ? ", " : "") << grid[i];
        table << "],\n   \"seconds\": [";
        table.precision(4);
        for (size_t i = 0; i < secs.size(); ++i) table << (i ? ", " : "") << std::scientific << secs[i];
        table << "],\n   \"seconds_eager_launch\": [";
        for (size_t i = 0; i < secs_eager.size(); ++i) table << (i ? ", " : "") << std::scientific << secs_eager[i];
        table << "]";
        if (!secs_sm90.empty()) {
            table << ",\n   \"seconds_sm90_grouped\": [";
            for (size_t i = 0; i < secs_sm90.size(); ++i) table << (i ? ", " : "") << std::scientific << secs_sm90[i];
            table << "]";
        }
        table << std::defaultfloat << "}";
        std::printf("%s f(n) us (graph/eager):", sh.name.c_str());
        for (size_t i = 0; i < grid.size(); i += 3) std::printf(" %d:%.1f/%.1f", grid[i], secs[i] * 1e6, secs_eager[i] * 1e6);
        std::printf("\n");
        if (!secs_sm90.empty()) {
            std::printf("%s f(n) us, sm90 grouped (per expert):", sh.name.c_str());
            for (size_t i = 0; i < grid.size(); i += 3) std::printf(" %d:%.2f", grid[i], secs_sm90[i] * 1e6);
            std::printf("\n");
        }
    }
    js << "}}\n";
    table << "}}\n";
    std::ofstream(out_dir + "/gpu_bench.json") << js.str();
    std::ofstream(out_dir + "/h100-gemm-table.json") << table.str();
    cublasDestroy(cublas);
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "bm_moe_gpu: error: %s\n", e.what());
    return 1;
}
