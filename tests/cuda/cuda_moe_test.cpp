// The GPU backend checked against host references (ggml test-backend-ops style): routing picks must be
// identical; the expert layer must match an fp32 CPU reference within a bf16 tolerance.
#include "grace/cuda_moe.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "grace/error.hpp"
#include "grouped_gemm_sm90.hpp"
#include "grace/plan.hpp"
#include "grace/routing.hpp"
#include "grace/topology.hpp"

namespace gc = grace::cuda;

namespace {

#define REQUIRE_GPU()                                                  \
    do {                                                               \
        if (!gc::device_available()) GTEST_SKIP() << "no CUDA device"; \
    } while (0)

// Sequential reference of spec §5 over the flat table: one counter per (source, expert).
struct HostRouter {
    gc::RouteTable t;
    std::vector<int32_t> off;
    explicit HostRouter(gc::RouteTable table) : t(std::move(table)), off(size_t(t.num_sources) * t.num_experts, 0) {}
    gc::RouteResult route(int s, const std::vector<int32_t>& idx, int T, int k) {
        const int G = t.num_sources, E = t.num_experts, Q = t.period;
        gc::RouteResult r;
        r.topk_instance.assign(size_t(T) * k, -1);
        r.topk_rank.assign(size_t(T) * k, -1);
        r.num_tokens_per_rank.assign(G, 0);
        r.num_tokens_per_instance.assign(t.instance_gpu.size(), 0);
        r.is_token_in_rank.assign(size_t(T) * G, 0);
        for (int tok = 0; tok < T; ++tok) {
            for (int j = 0; j < k; ++j) {
                const int e = idx[size_t(tok) * k + j];
                if (e < 0 || e >= E) continue;
                int& o = off[size_t(s) * E + e];
                const int inst = t.sequence[(size_t(s) * E + e) * Q + o];
                o = (o + 1) % Q;
                const int g = t.instance_gpu[t.instance_ptr[e] + inst];
                r.topk_instance[size_t(tok) * k + j] = inst;
                r.topk_rank[size_t(tok) * k + j] = g;
                r.num_tokens_per_instance[t.instance_ptr[e] + inst]++;
                r.is_token_in_rank[size_t(tok) * G + g] = 1;
            }
            for (int g = 0; g < G; ++g) r.num_tokens_per_rank[g] += r.is_token_in_rank[size_t(tok) * G + g];
        }
        return r;
    }
};

grace::LayerPlan random_layer(std::mt19937& rng, int E, int G, int Q) {
    grace::LayerPlan layer;
    layer.wrr_period = Q;
    layer.instance_gpus.resize(E);
    layer.wrr_weights.resize(E);
    std::uniform_real_distribution<double> w(0.2, 3.0);
    for (int e = 0; e < E; ++e) {
        std::vector<int> gpus(G);
        std::iota(gpus.begin(), gpus.end(), 0);
        std::shuffle(gpus.begin(), gpus.end(), rng);
        const int n = 1 + int(rng() % std::min(G, 4));
        std::vector<int> inst{gpus[0]};
        std::vector<int> reps(gpus.begin() + 1, gpus.begin() + n);
        std::sort(reps.begin(), reps.end());
        inst.insert(inst.end(), reps.begin(), reps.end());
        layer.instance_gpus[e] = inst;
        std::vector<double> ws;
        for (int i = 0; i < n; ++i) ws.push_back(w(rng));
        layer.wrr_weights[e] = grace::round_weights(ws, Q);
    }
    return layer;
}

std::vector<int32_t> random_topk(std::mt19937& rng, int T, int k, int E, double mask_frac) {
    std::vector<int32_t> idx(size_t(T) * k);
    std::vector<int> ids(E);
    std::iota(ids.begin(), ids.end(), 0);
    std::uniform_real_distribution<double> u(0, 1);
    for (int t = 0; t < T; ++t) {
        // skew: half the tokens draw from the first quarter of the experts
        const int pool = (u(rng) < 0.5) ? std::max(k, E / 4) : E;
        std::shuffle(ids.begin(), ids.begin() + pool, rng);
        for (int j = 0; j < k; ++j) idx[size_t(t) * k + j] = u(rng) < mask_frac ? -1 : ids[j];
    }
    return idx;
}

// n bf16 values drawn from N(0, scale^2).
std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n, float scale) {
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<uint16_t> v(n);
    for (auto& b : v) b = gc::float_to_bf16(nd(rng) * scale);
    return v;
}

}  // namespace

TEST(RouteTable, TarStaysInNearestTier) {
    std::mt19937 rng(7);
    const grace::Topology topo{2, 4};
    const auto layer = random_layer(rng, 32, 8, 120);
    const auto t = gc::build_route_table(layer, topo, grace::RoutingPolicy::kTar);
    t.validate();
    for (int s = 0; s < 8; ++s)
        for (int e = 0; e < 32; ++e) {
            const auto& gpus = layer.instance_gpus[e];
            const bool local = std::count(gpus.begin(), gpus.end(), s) > 0;
            const bool node = std::any_of(gpus.begin(), gpus.end(), [&](int g) { return g / 4 == s / 4; });
            for (int q = 0; q < 120; ++q) {
                const int g = gpus[t.sequence[(size_t(s) * 32 + e) * 120 + q]];
                if (local)
                    EXPECT_EQ(g, s);
                else if (node)
                    EXPECT_EQ(g / 4, s / 4);
            }
        }
}

TEST(GpuReplicaRouter, MatchesHostReference) {
    REQUIRE_GPU();
    std::mt19937 rng(12345);
    const grace::Topology topo{2, 4};
    for (auto policy : {grace::RoutingPolicy::kWrr, grace::RoutingPolicy::kTar, grace::RoutingPolicy::kPrimary}) {
        for (int E : {16, 128}) {
            const auto layer = random_layer(rng, E, topo.num_gpus(), 120);
            const auto table = gc::build_route_table(layer, topo, policy);
            gc::GpuReplicaRouter gpu(table);
            HostRouter host(table);
            for (int batch = 0; batch < 8; ++batch) {
                const int k = (batch % 2) ? 8 : 4;
                const int T = std::vector<int>{0, 1, 37, 1000, 5000, 300, 2049, 64}[batch];
                const int s = int(rng() % topo.num_gpus());
                const auto idx = random_topk(rng, T, k, E, batch == 3 ? 0.1 : 0.0);
                const auto g = gpu.route_host(s, idx, T, k);
                const auto h = host.route(s, idx, T, k);
                ASSERT_EQ(g.topk_instance, h.topk_instance)
                    << "policy " << int(policy) << " E " << E << " batch " << batch;
                ASSERT_EQ(g.topk_rank, h.topk_rank);
                ASSERT_EQ(g.num_tokens_per_rank, h.num_tokens_per_rank);
                ASSERT_EQ(g.num_tokens_per_instance, h.num_tokens_per_instance);
                ASSERT_EQ(g.is_token_in_rank, h.is_token_in_rank);
                ASSERT_EQ(gpu.offsets(), host.off);
            }
        }
    }
}

// The table (host side, no GPU needed) replayed sequentially equals the CPU router's picks.
TEST(RouteTable, ReplayMatchesCpuReplicaRouter) {
    std::mt19937 rng(5);
    const grace::Topology topo{2, 4};
    for (auto policy : {grace::RoutingPolicy::kWrr, grace::RoutingPolicy::kTar, grace::RoutingPolicy::kPrimary}) {
        const auto layer = random_layer(rng, 32, topo.num_gpus(), 120);
        HostRouter host(gc::build_route_table(layer, topo, policy));
        grace::ReplicaRouter cpu(layer, topo, policy);
        for (int batch = 0; batch < 4; ++batch) {
            const int T = 500, k = 4, s = int(rng() % 8);
            const auto idx = random_topk(rng, T, k, 32, 0.0);
            const auto h = host.route(s, idx, T, k);
            for (size_t p = 0; p < idx.size(); ++p)
                ASSERT_EQ(h.topk_rank[p], cpu.route(s, idx[p], int64_t(p) / k, int(p % k), k));
        }
    }
}

// The GPU router against the project's CPU router (src/core/routing.cpp), selection by selection.
TEST(GpuReplicaRouter, MatchesCpuReplicaRouter) {
    REQUIRE_GPU();
    std::mt19937 rng(99);
    const grace::Topology topo{2, 4};
    for (auto policy : {grace::RoutingPolicy::kWrr, grace::RoutingPolicy::kTar, grace::RoutingPolicy::kPrimary}) {
        const int E = 64, k = 8;
        const auto layer = random_layer(rng, E, topo.num_gpus(), 120);
        gc::GpuReplicaRouter gpu(gc::build_route_table(layer, topo, policy));
        grace::ReplicaRouter cpu(layer, topo, policy);
        for (int batch = 0; batch < 6; ++batch) {
            const int T = 1 + int(rng() % 3000);
            const int s = int(rng() % topo.num_gpus());
            const auto idx = random_topk(rng, T, k, E, 0.0);
            const auto g = gpu.route_host(s, idx, T, k);
            for (int t = 0; t < T; ++t)
                for (int j = 0; j < k; ++j) {
                    const size_t p = size_t(t) * k + j;
                    const int want = cpu.route(s, idx[p], t, j, k);
                    ASSERT_EQ(g.topk_rank[p], want) << "policy " << int(policy) << " batch " << batch << " t " << t;
                    ASSERT_EQ(g.topk_instance[p], cpu.last_instance());
                }
        }
    }
}

namespace {

// fp32 reference on the bf16 inputs (no intermediate rounding).
std::vector<float> cpu_moe(const gc::LocalMoeShape& sh, const std::vector<float>& w13, const std::vector<float>& w2,
                           const std::vector<float>& x, const std::vector<int32_t>& idx, const std::vector<float>& wt,
                           int T) {
    const int H = sh.hidden, I = sh.intermediate, k = sh.top_k;
    std::vector<float> out(size_t(T) * H, 0.f), y(2 * I), a(I);
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
            const int e = idx[size_t(t) * k + j];
            if (e < 0) continue;
            for (int r = 0; r < 2 * I; ++r) {
                double s = 0;
                for (int c = 0; c < H; ++c) s += double(w13[(size_t(e) * 2 * I + r) * H + c]) * x[size_t(t) * H + c];
                y[r] = float(s);
            }
            for (int r = 0; r < I; ++r) a[r] = y[r] / (1.f + std::exp(-y[r])) * y[I + r];
            for (int r = 0; r < H; ++r) {
                double s = 0;
                for (int c = 0; c < I; ++c) s += double(w2[(size_t(e) * H + r) * I + c]) * a[c];
                out[size_t(t) * H + r] += wt[size_t(t) * k + j] * float(s);
            }
        }
    return out;
}

void check_moe(gc::LocalMoeShape sh, int T, double mask, gc::GroupedGemmBackend backend, uint32_t seed,
               int hybrid_threshold = 1024) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](size_t n, float scale, std::vector<uint16_t>& b, std::vector<float>& f) {
        b.resize(n), f.resize(n);
        for (size_t i = 0; i < n; ++i) b[i] = gc::float_to_bf16(nd(rng) * scale), f[i] = gc::bf16_to_float(b[i]);
    };
    const int E = sh.num_experts, H = sh.hidden, I = sh.intermediate, k = sh.top_k;
    std::vector<uint16_t> bw13, bw2, bx;
    std::vector<float> fw13, fw2, fx;
    fill(size_t(E) * 2 * I * H, 1.f / std::sqrt(float(H)), bw13, fw13);
    fill(size_t(E) * H * I, 1.f / std::sqrt(float(I)), bw2, fw2);
    fill(size_t(T) * H, 1.f, bx, fx);
    const auto idx = random_topk(rng, T, k, E, mask);
    std::vector<float> wt(size_t(T) * k);
    std::uniform_real_distribution<float> u(0.05f, 1.f);
    for (auto& w : wt) w = u(rng);
    const auto out = gc::LocalMoe::forward_host(sh, backend, bw13, bw2, bx, idx, wt, T, hybrid_threshold);
    const auto ref = cpu_moe(sh, fw13, fw2, fx, idx, wt, T);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const float o = gc::bf16_to_float(out[i]);
        ASSERT_TRUE(std::isfinite(o)) << "element " << i << " not written or not finite";
        num += double(o - ref[i]) * (o - ref[i]);
        den += double(ref[i]) * ref[i];
    }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    // bf16 storage of x, weights and the two intermediates (8 mantissa bits): expect ~4e-3; allow 1e-2.
    EXPECT_LT(rel, 1e-2) << "T " << T << " E " << E << " k " << k << " backend " << int(backend);
    std::printf("  rel_l2 %.3e (T %d, E %d, k %d, H %d, I %d)\n", rel, T, E, k, H, I);
}

}  // namespace

TEST(LocalMoe, MatchesCpuReferenceGrouped) {
    REQUIRE_GPU();
    check_moe({16, 2, 64, 32}, 5, 0.0, gc::GroupedGemmBackend::kCublasGrouped, 1);  // most experts empty
    check_moe({8, 2, 64, 32}, 37, 0.1, gc::GroupedGemmBackend::kCublasGrouped, 2);  // masked selections
    check_moe({64, 8, 256, 128}, 300, 0.0, gc::GroupedGemmBackend::kCublasGrouped, 3);
}

TEST(LocalMoe, MatchesCpuReferenceLoop) {
    REQUIRE_GPU();
    check_moe({16, 2, 64, 32}, 5, 0.0, gc::GroupedGemmBackend::kCublasLoop, 4);
    check_moe({8, 2, 64, 32}, 37, 0.1, gc::GroupedGemmBackend::kCublasLoop, 5);
    check_moe({128, 8, 128, 96}, 600, 0.0, gc::GroupedGemmBackend::kCublasLoop, 6);
}

TEST(LocalMoe, MatchesCpuReferenceHybrid) {
    REQUIRE_GPU();
    // threshold 40: the popular experts get their own GEMM, the rest go through the grouped call
    check_moe({64, 8, 256, 128}, 300, 0.05, gc::GroupedGemmBackend::kHybrid, 7, 40);
    check_moe({32, 4, 128, 64}, 1000, 0.0, gc::GroupedGemmBackend::kHybrid, 8, 100);
}

// Our Hopper grouped GEMM: one k-tile (H=64), K and N tails (H=200: the last k-tile and column tile are partial),
// more k-tiles than pipeline stages (H=1024, I=384), experts spanning several 128-row tiles, more tiles than SMs,
// empty experts and masked selections; each in the four launch/epilogue variants.
TEST(LocalMoe, MatchesCpuReferenceSm90) {
    REQUIRE_GPU();
    if (!gc::sm90_gemm_available()) GTEST_SKIP() << "needs a compute capability 9.0 GPU";
    // Default (persistent, kAuto epilogue), every epilogue direct, every epilogue staged, one block per tile.
    using Ep = gc::detail::Sm90Epilogue;
    for (const auto& [persistent, epilogue] :
         {std::pair{true, Ep::kAuto}, std::pair{true, Ep::kDirect}, std::pair{true, Ep::kStaged},
          std::pair{false, Ep::kAuto}}) {
        SCOPED_TRACE(::testing::Message() << "persistent " << persistent << " epilogue " << int(epilogue));
        gc::detail::sm90_set_persistent(persistent);
        gc::detail::sm90_set_epilogue(epilogue);
        check_moe({16, 2, 64, 128}, 5, 0.0, gc::GroupedGemmBackend::kSm90, 11);
        check_moe({8, 2, 200, 128}, 37, 0.1, gc::GroupedGemmBackend::kSm90, 12);
        check_moe({64, 8, 256, 256}, 300, 0.05, gc::GroupedGemmBackend::kSm90, 13);
        check_moe({128, 8, 128, 128}, 600, 0.0, gc::GroupedGemmBackend::kSm90, 14);
        check_moe({4, 2, 1024, 384}, 700, 0.0, gc::GroupedGemmBackend::kSm90, 15);
        // ~200 tiles per GEMM: more than an H100's 132 SMs, so persistent blocks take several tiles each
        check_moe({32, 4, 512, 256}, 2500, 0.0, gc::GroupedGemmBackend::kSm90, 16);
    }
    gc::detail::sm90_set_persistent(true);
    gc::detail::sm90_set_epilogue(Ep::kAuto);
}

// kSm90 never waits for the host inside forward(); last_counts() then waits for the counts and must still equal
// the routing's histogram. kAuto picks kSm90 where it runs and fits, kHybrid otherwise.
TEST(LocalMoe, Sm90CountsAndBackendChoice) {
    REQUIRE_GPU();
    const gc::LocalMoeShape fits{8, 2, 64, 128}, odd{8, 2, 64, 96};
    EXPECT_EQ(gc::LocalMoe(odd, 16).backend(), gc::GroupedGemmBackend::kHybrid);
    if (!gc::sm90_gemm_available()) {
        EXPECT_EQ(gc::LocalMoe(fits, 16).backend(), gc::GroupedGemmBackend::kHybrid);
        GTEST_SKIP() << "needs a compute capability 9.0 GPU";
    }
    EXPECT_EQ(gc::LocalMoe(fits, 16).backend(), gc::GroupedGemmBackend::kSm90);
    try {
        gc::LocalMoe bad(odd, 16, gc::GroupedGemmBackend::kSm90);
        ADD_FAILURE() << "kSm90 with intermediate 96 was accepted";
    } catch (const grace::Error& e) {
        EXPECT_EQ(e.code(), grace::ErrorCode::kUnsupported);
    }
    std::mt19937 rng(3);
    const int T = 333;
    const auto idx = random_topk(rng, T, fits.top_k, fits.num_experts, 0.1);
    std::vector<int32_t> expect(fits.num_experts, 0);
    for (int32_t e : idx)
        if (e >= 0) ++expect[e];
    gc::DeviceBuffer<uint16_t> w13(size_t(8) * 2 * 128 * 64), w2(size_t(8) * 64 * 128), x(size_t(T) * 64),
        out(size_t(T) * 64);
    CUDA_RUNTIME_CHECK(cudaMemset(w13.data(), 0, w13.bytes()));
    CUDA_RUNTIME_CHECK(cudaMemset(w2.data(), 0, w2.bytes()));
    CUDA_RUNTIME_CHECK(cudaMemset(x.data(), 0, x.bytes()));
    gc::DeviceBuffer<int32_t> d_idx;
    d_idx.upload(idx);
    gc::DeviceBuffer<float> d_w;
    d_w.upload(std::vector<float>(idx.size(), 1.f));
    gc::LocalMoe moe(fits, T);
    moe.set_weights(w13.data(), w2.data());
    moe.forward(x.data(), d_idx.data(), d_w.data(), out.data(), T);
    EXPECT_EQ(moe.last_counts(), expect);
}

// forward_f32 writes the widened bf16 sums of forward(): the same values, element for element, on each backend
// (masked selections included; out is poisoned first so an unwritten element shows).
TEST(LocalMoe, ForwardF32IsTheWidenedBf16Output) {
    REQUIRE_GPU();
    std::vector<gc::GroupedGemmBackend> backends{gc::GroupedGemmBackend::kCublasGrouped,
                                                 gc::GroupedGemmBackend::kHybrid};
    if (gc::sm90_gemm_available()) backends.push_back(gc::GroupedGemmBackend::kSm90);
    const gc::LocalMoeShape sh{16, 4, 128, 128};
    const int T = 257;
    std::mt19937 rng(21);
    std::normal_distribution<float> nd(0.f, 1.f);
    const auto w13 = random_bf16(rng, size_t(16) * 2 * 128 * 128, 0.1f);
    const auto w2 = random_bf16(rng, size_t(16) * 128 * 128, 0.1f), x = random_bf16(rng, size_t(T) * 128, 1.f);
    const auto idx = random_topk(rng, T, sh.top_k, sh.num_experts, 0.1);
    std::vector<float> wt(idx.size());
    for (auto& w : wt) w = 0.05f + std::abs(nd(rng));
    gc::DeviceBuffer<uint16_t> dw13, dw2, dx, out16(size_t(T) * 128);
    gc::DeviceBuffer<int32_t> didx;
    gc::DeviceBuffer<float> dwt, out32(size_t(T) * 128);
    dw13.upload(w13), dw2.upload(w2), dx.upload(x), didx.upload(idx), dwt.upload(wt);
    for (auto backend : backends) {
        SCOPED_TRACE(::testing::Message() << "backend " << int(backend));
        gc::LocalMoe moe(sh, T, backend);
        moe.set_weights(dw13.data(), dw2.data());
        CUDA_RUNTIME_CHECK(cudaMemset(out32.data(), 0xff, out32.bytes()));
        moe.forward(dx.data(), didx.data(), dwt.data(), out16.data(), T);
        moe.forward_f32(dx.data(), didx.data(), dwt.data(), out32.data(), T);
        CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
        const auto a = out16.download(size_t(T) * 128);
        const auto b = out32.download(size_t(T) * 128);
        for (size_t i = 0; i < a.size(); ++i) {
            const float widened = gc::bf16_to_float(a[i]);
            ASSERT_EQ(std::memcmp(&widened, &b[i], 4), 0) << "element " << i << ": " << widened << " vs " << b[i];
        }
    }
}

// kSm90 forward_f32 captured in a CUDA graph: replays on new inputs in the captured buffers equal uncaptured calls
// bit for bit; last_counts() then throws (the counts stay on the device) until an uncaptured forward. The cuBLAS
// backend refuses a capture before queueing anything (the graph ends empty).
TEST(LocalMoe, Sm90ForwardCapturedInACudaGraph) {
    REQUIRE_GPU();
    if (!gc::sm90_gemm_available()) GTEST_SKIP() << "needs a compute capability 9.0 GPU";
    const gc::LocalMoeShape sh{16, 4, 128, 128};
    const int T = 300;
    std::mt19937 rng(33);
    std::normal_distribution<float> nd(0.f, 1.f);
    gc::DeviceBuffer<uint16_t> dw13, dw2, dx(size_t(T) * 128);
    gc::DeviceBuffer<int32_t> didx(size_t(T) * sh.top_k);
    gc::DeviceBuffer<float> dwt(size_t(T) * sh.top_k), out(size_t(T) * 128), ref(size_t(T) * 128);
    dw13.upload(random_bf16(rng, size_t(16) * 2 * 128 * 128, 0.1f));
    dw2.upload(random_bf16(rng, size_t(16) * 128 * 128, 0.1f));
    auto write_inputs = [&] {
        const auto x = random_bf16(rng, size_t(T) * 128, 1.f);
        const auto idx = random_topk(rng, T, sh.top_k, sh.num_experts, 0.1);
        std::vector<float> wt(idx.size());
        for (auto& w : wt) w = 0.05f + std::abs(nd(rng));
        CUDA_RUNTIME_CHECK(cudaMemcpy(dx.data(), x.data(), x.size() * 2, cudaMemcpyHostToDevice));
        CUDA_RUNTIME_CHECK(cudaMemcpy(didx.data(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
        CUDA_RUNTIME_CHECK(cudaMemcpy(dwt.data(), wt.data(), wt.size() * 4, cudaMemcpyHostToDevice));
    };
    cudaStream_t stream = nullptr;
    CUDA_RUNTIME_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    gc::LocalMoe graphed(sh, T, gc::GroupedGemmBackend::kSm90), eager(sh, T, gc::GroupedGemmBackend::kSm90);
    graphed.set_weights(dw13.data(), dw2.data());
    eager.set_weights(dw13.data(), dw2.data());
    write_inputs();
    CUDA_RUNTIME_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    graphed.forward_f32(dx.data(), didx.data(), dwt.data(), out.data(), T, stream);
    cudaGraph_t graph = nullptr;
    CUDA_RUNTIME_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec = nullptr;
    CUDA_RUNTIME_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_RUNTIME_CHECK(cudaGraphDestroy(graph));
    EXPECT_THROW(graphed.last_counts(), grace::Error);
    for (int rep = 0; rep < 3; ++rep) {
        if (rep) write_inputs();
        CUDA_RUNTIME_CHECK(cudaMemset(out.data(), 0xff, out.bytes()));
        CUDA_RUNTIME_CHECK(cudaGraphLaunch(exec, stream));
        eager.forward_f32(dx.data(), didx.data(), dwt.data(), ref.data(), T, stream);
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        EXPECT_EQ(out.download(size_t(T) * 128), ref.download(size_t(T) * 128)) << "replay " << rep;
    }
    CUDA_RUNTIME_CHECK(cudaGraphExecDestroy(exec));
    graphed.forward_f32(dx.data(), didx.data(), dwt.data(), out.data(), T, stream);  // uncaptured: counts again
    EXPECT_EQ(graphed.last_counts(), eager.last_counts());
    // The cuBLAS backend cannot be captured: refused with nothing queued.
    gc::LocalMoe cublas(sh, T, gc::GroupedGemmBackend::kCublasGrouped);
    cublas.set_weights(dw13.data(), dw2.data());
    CUDA_RUNTIME_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    EXPECT_THROW(cublas.forward_f32(dx.data(), didx.data(), dwt.data(), out.data(), T, stream), grace::Error);
    CUDA_RUNTIME_CHECK(cudaStreamEndCapture(stream, &graph));
    size_t nodes = 1;
    CUDA_RUNTIME_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
    EXPECT_EQ(nodes, 0u);
    CUDA_RUNTIME_CHECK(cudaGraphDestroy(graph));
    CUDA_RUNTIME_CHECK(cudaStreamDestroy(stream));
}

TEST(LocalMoe, ZeroTokensIsANoOp) {
    REQUIRE_GPU();
    gc::LocalMoeShape sh{4, 2, 64, 32};
    const auto out =
        gc::LocalMoe::forward_host(sh, gc::GroupedGemmBackend::kCublasGrouped, std::vector<uint16_t>(4 * 64 * 64),
                                   std::vector<uint16_t>(4 * 64 * 32), {}, {}, {}, 0);
    EXPECT_TRUE(out.empty());
}

TEST(LocalMoe, RejectsBadShape) { EXPECT_THROW(gc::LocalMoe(gc::LocalMoeShape{4, 2, 60, 32}, 16), grace::Error); }
