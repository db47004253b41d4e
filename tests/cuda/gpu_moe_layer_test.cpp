// The GPU MoE layer against the CPU reference backend (the runtime's MoeLayer), rank by rank:
// - 1x1 over the real "nccl" communicator (one process; run it under mpirun -n 1 on a device);
// - 2x2 and 1x4 topologies with 4 ranks as 4 threads sharing the one GPU (ThreadHub test double), the CPU
//   MoeLayer over the same hub in host memory, so flat / flat-dedup / hsc exchanges with real peers are covered.
// Routing decisions must be identical (destination GPU of every selection, across two batches so the WRR
// offsets carry); outputs within the documented bf16 tolerance (relative L2 <= 2e-2 per rank).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>

#include "device_buffer.hpp"
#include "grace/communicator.hpp"
#include "grace/cuda_layer.hpp"
#include "grace/cuda_moe.hpp"
#include "grace/error.hpp"
#include "grace/experts.hpp"
#include "grace/plan.hpp"
#include "grace/runtime.hpp"
#include "hub_communicator.hpp"

namespace gc = grace::cuda;
using grace::CommScheme;
using grace::RoutingPolicy;

namespace {

#define REQUIRE_GPU()                                                  \
    do {                                                               \
        if (!gc::device_available()) GTEST_SKIP() << "no CUDA device"; \
    } while (0)

constexpr double kTolerance = 2e-2;

uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
double unit(uint64_t a, uint64_t b) { return (mix(a * 0x100000001b3ull ^ mix(b)) >> 11) * 0x1.0p-53; }

// Expert e's primary on GPU (e * 5) % G; the first E/4 experts ("hot") get one or two replicas; non-uniform
// WRR weights. Every GPU holds at least one expert.
grace::LayerPlan make_layer(int E, const grace::Topology& topo) {
    const int G = topo.num_gpus();
    grace::LayerPlan layer;
    layer.gpu_experts.assign(G, {});
    layer.primary_gpu.resize(E);
    for (int e = 0; e < E; ++e) {
        const int p = (e * 5) % G;
        layer.primary_gpu[e] = p;
        layer.gpu_experts[p].push_back(e);
        if (e < E / 4 && G > 1) {
            layer.gpu_experts[(p + 1) % G].push_back(e);
            if (e % 2 == 0 && G > 2) layer.gpu_experts[(p + G / 2 + 1) % G].push_back(e);
        }
    }
    for (auto& v : layer.gpu_experts) {
        std::sort(v.begin(), v.end());
        v.erase(std::unique(v.begin(), v.end()), v.end());
    }
    layer.wrr_period = 60;
    layer.finalize(E);
    for (int e = 0; e < E; ++e) {
        std::vector<double> w;
        for (size_t i = 0; i < layer.instance_gpus[e].size(); ++i) w.push_back(1.0 + (e + 3 * i) % 4);
        layer.wrr_weights[e] = grace::round_weights(w, layer.wrr_period);
    }
    return layer;
}

struct Batch {
    std::vector<float> hidden;  // bf16-representable values
    std::vector<int32_t> ids;
    std::vector<float> weights;
};

// Skewed top-k without replacement (half the tokens draw from the first quarter of the experts), 5% masked.
Batch make_batch(uint64_t seed, int T, int k, int E, int H) {
    Batch b;
    b.hidden.resize(size_t(T) * H);
    for (size_t i = 0; i < b.hidden.size(); ++i)
        b.hidden[i] = gc::bf16_to_float(gc::float_to_bf16(static_cast<float>(2 * unit(seed, i) - 1)));
    b.ids.assign(size_t(T) * k, -1);
    b.weights.assign(size_t(T) * k, 0.0f);
    std::vector<int> pool(E);
    for (int t = 0; t < T; ++t) {
        std::iota(pool.begin(), pool.end(), 0);
        const int n = unit(seed + 1, t) < 0.5 ? std::max(k, E / 4) : E;
        for (int j = 0; j < k; ++j) {
            const int pick = j + static_cast<int>(unit(seed + 2, size_t(t) * k + j) * (n - j));
            std::swap(pool[j], pool[pick]);
            const bool masked = unit(seed + 3, size_t(t) * k + j) < 0.05;
            b.ids[size_t(t) * k + j] = masked ? -1 : pool[j];
            b.weights[size_t(t) * k + j] = static_cast<float>(0.05 + unit(seed + 4, size_t(t) * k + j));
        }
    }
    return b;
}

// Experts 0..E-1 of a shape (seed 1234, layer 0, bf16), made once per shape over all cores: at the model shapes
// making them is most of a comparison's time, and every comparison of a shape uses the same ones.
std::mutex g_pool_mutex;
std::map<std::pair<int, int>, std::vector<grace::ExpertWeights>> g_pool;

void warm_experts(int E, grace::ExpertShape shape) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    auto& pool = g_pool[{shape.hidden, shape.intermediate}];
    const int have = static_cast<int>(pool.size());
    if (have >= E) return;
    pool.resize(E);
    const int nt = std::max(1, std::min<int>(E - have, static_cast<int>(std::thread::hardware_concurrency())));
    std::vector<std::thread> workers;
    for (int w = 0; w < nt; ++w)
        workers.emplace_back([&, w] {
            for (int e = have + w; e < E; e += nt)
                pool[e] = grace::random_expert(1234, 0, e, shape, grace::DType::kBF16);
        });
    for (auto& t : workers) t.join();
}

std::vector<grace::ExpertWeights> experts_of(const grace::LayerPlan& layer, int g, grace::ExpertShape shape) {
    int E = 0;
    for (int e : layer.gpu_experts[g]) E = std::max(E, e + 1);
    warm_experts(E, shape);
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    const auto& pool = g_pool[{shape.hidden, shape.intermediate}];
    std::vector<grace::ExpertWeights> w;
    for (int e : layer.gpu_experts[g]) w.push_back(pool[e]);
    return w;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Case {
    int E, k, H, I, T;
};

// Runs two batches per rank on the CPU MoeLayer and the GPU layer (G threads over two hubs) and compares.
void compare_on_hub(const grace::Topology& topo, const Case& c, CommScheme scheme, RoutingPolicy policy) {
    const int G = topo.num_gpus();
    const auto layer = make_layer(c.E, topo);
    warm_experts(c.E, {c.H, c.I});
    grace::test::ThreadHub host_hub(G), dev_hub(G);
    std::vector<std::string> failures(G);
    std::vector<double> errors(G * 2, 0);
    std::vector<std::thread> threads;
    for (int r = 0; r < G; ++r)
        threads.emplace_back([&, r] {
            try {
                grace::test::HubCommunicator hc(host_hub, topo, r, grace::MemorySpace::kHost);
                grace::test::HubCommunicator dc(dev_hub, topo, r, grace::MemorySpace::kDevice);
                const grace::ExpertShape shape{c.H, c.I};
                grace::MoeLayerOptions co;
                co.scheme = scheme, co.policy = policy, co.routing_seed = 7;
                auto weights = experts_of(layer, r, shape);
                grace::MoeLayer cpu(layer, topo, hc, weights, co);
                gc::GpuMoeLayerOptions go;
                go.scheme = scheme, go.policy = policy, go.routing_seed = 7;
                gc::GpuMoeLayer gpu(layer, topo, dc, std::move(weights), go);
                for (int call = 0; call < 2; ++call) {
                    const int T = c.T + call * 3 - r;  // uneven batches; may differ per rank
                    const Batch b = make_batch(100 * call + r, T, c.k, c.E, c.H);
                    const int64_t first = int64_t(call) * 1000 + int64_t(r) * T;
                    const auto ref = cpu.forward(b.hidden, b.ids, b.weights, c.k, first);
                    const auto out = gpu.forward(b.hidden, b.ids, b.weights, c.k, first);
                    if (gpu.last_dest_ranks() != cpu.last_dest_ranks())
                        failures[r] += grace::cat("call ", call, ": destinations differ; ");
                    if (gpu.routed_on_device() != (policy == RoutingPolicy::kWrr || policy == RoutingPolicy::kTar ||
                                                   policy == RoutingPolicy::kPrimary))
                        failures[r] += "routed on the wrong side; ";
                    errors[r * 2 + call] = rel_l2(out, ref);
                    if (!(errors[r * 2 + call] <= kTolerance))
                        failures[r] += grace::cat("call ", call, ": rel L2 ", errors[r * 2 + call], "; ");
                    // Same wire traffic pattern as the CPU layer (copies per link class).
                    for (int lc = 0; lc < 2; ++lc)
                        if (gpu.last_stats().dispatch[lc].copies != cpu.last_stats().dispatch[lc].copies)
                            failures[r] +=
                                grace::cat("call ", call, " link ", lc, ": ", gpu.last_stats().dispatch[lc].copies,
                                           " copies vs CPU ", cpu.last_stats().dispatch[lc].copies, "; ");
                }
            } catch (const std::exception& e) {
                failures[r] += e.what();
            }
        });
    for (auto& t : threads) t.join();
    double worst = 0;
    for (double e : errors) worst = std::max(worst, e);
    for (int r = 0; r < G; ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
    std::printf("[ %s %s %s E=%d H=%d I=%d ] max rel L2 %.2e\n", topo.to_string().c_str(),
                grace::to_string(scheme).c_str(), grace::to_string(policy).c_str(), c.E, c.H, c.I, worst);
}

const RoutingPolicy kPolicies[] = {RoutingPolicy::kPrimary,      RoutingPolicy::kWrr,
                                   RoutingPolicy::kTar,          RoutingPolicy::kVllm,
                                   RoutingPolicy::kSglangStatic, RoutingPolicy::kSglangDynamic};
const CommScheme kSchemes[] = {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::kHsc};

}  // namespace

TEST(GpuMoeLayer, SmallShapeEverySchemeAndPolicy2x2) {
    REQUIRE_GPU();
    for (auto scheme : kSchemes)
        for (auto policy : kPolicies) compare_on_hub(grace::Topology{2, 2}, Case{16, 4, 64, 32, 40}, scheme, policy);
}

TEST(GpuMoeLayer, SmallShapeOneNodeAndFourNodes) {
    REQUIRE_GPU();
    for (auto scheme : kSchemes) {
        compare_on_hub(grace::Topology{1, 4}, Case{16, 4, 64, 32, 33}, scheme, RoutingPolicy::kTar);
        compare_on_hub(grace::Topology{4, 1}, Case{16, 4, 64, 32, 33}, scheme, RoutingPolicy::kWrr);
    }
}

// The model shapes of the issue (olmoe: E=64, k=8, H=2048, I=1024; qwen3-30b-a3b: E=128, k=8, H=2048, I=768),
// every routing policy, 2x2, with all three schemes for TAR and HSC for the rest (the CPU reference is slow).
TEST(GpuMoeLayer, OlmoeShapeEveryPolicy) {
    REQUIRE_GPU();
    const auto& p = grace::find_expert_preset("olmoe");
    const Case c{p.num_experts, 8, p.shape.hidden, p.shape.intermediate, 24};
    for (auto policy : kPolicies) compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kHsc, policy);
    compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kFlat, RoutingPolicy::kTar);
    compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kFlatDedup, RoutingPolicy::kTar);
}

TEST(GpuMoeLayer, Qwen3ShapeEveryPolicy) {
    REQUIRE_GPU();
    const auto& p = grace::find_expert_preset("qwen3-30b-a3b");
    const Case c{p.num_experts, 8, p.shape.hidden, p.shape.intermediate, 24};
    for (auto policy : kPolicies) compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kHsc, policy);
    compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kFlat, RoutingPolicy::kWrr);
    compare_on_hub(grace::Topology{2, 2}, c, CommScheme::kFlatDedup, RoutingPolicy::kWrr);
}

// 1x1 over the real NCCL communicator against the CPU MoeLayer over the "local" communicator.
TEST(GpuMoeLayer, OneGpuOverNcclMatchesCpu) {
    REQUIRE_GPU();
    if (grace::launched_process_count() != 1) GTEST_SKIP() << "1x1 test: run with one process";
    const grace::Topology topo{1, 1};
    auto nccl = grace::make_communicator("nccl", {topo});
    auto local = grace::make_communicator("local", {topo});
    ASSERT_EQ(nccl->memory_space(), grace::MemorySpace::kDevice);
    const Case c{16, 4, 128, 64, 50};
    const auto layer = make_layer(c.E, topo);
    for (auto scheme : kSchemes)
        for (auto policy : {RoutingPolicy::kTar, RoutingPolicy::kVllm}) {
            grace::MoeLayerOptions co;
            co.scheme = scheme, co.policy = policy;
            gc::GpuMoeLayerOptions go;
            go.scheme = scheme, go.policy = policy;
            grace::MoeLayer cpu(layer, topo, *local, experts_of(layer, 0, {c.H, c.I}), co);
            gc::GpuMoeLayer gpu(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
            const Batch b = make_batch(5, c.T, c.k, c.E, c.H);
            const auto ref = cpu.forward(b.hidden, b.ids, b.weights, c.k);
            const auto out = gpu.forward(b.hidden, b.ids, b.weights, c.k);
            EXPECT_EQ(gpu.last_dest_ranks(), cpu.last_dest_ranks());
            EXPECT_LE(rel_l2(out, ref), kTolerance) << grace::to_string(scheme) << " " << grace::to_string(policy);
            // Zero tokens is a valid call.
            EXPECT_TRUE(gpu.forward(std::vector<float>{}, {}, {}, c.k).empty());
        }
}

TEST(GpuMoeLayer, RejectsHostCommunicatorAndMissingExperts) {
    REQUIRE_GPU();
    const grace::Topology topo{1, 1};
    auto local = grace::make_communicator("local", {topo});
    const auto layer = make_layer(8, topo);
    EXPECT_THROW(gc::GpuMoeLayer(layer, topo, *local, experts_of(layer, 0, {64, 32})), grace::Error);
    grace::test::ThreadHub hub(1);
    grace::test::HubCommunicator dc(hub, topo, 0, grace::MemorySpace::kDevice);
    auto some = experts_of(layer, 0, {64, 32});
    some.pop_back();
    EXPECT_THROW(gc::GpuMoeLayer(layer, topo, dc, std::move(some)), grace::Error);
}

// ---- Stream-ordered phases (dispatch / received / experts / combine, forward_async) ----
namespace {

struct DeviceBatch {
    grace::cuda::DeviceBuffer<uint16_t> hidden;
    grace::cuda::DeviceBuffer<int32_t> ids;
    grace::cuda::DeviceBuffer<float> weights;
    explicit DeviceBatch(const Batch& b) {
        std::vector<uint16_t> x(b.hidden.size());
        for (size_t i = 0; i < x.size(); ++i) x[i] = gc::float_to_bf16(b.hidden[i]);
        hidden.upload(x.empty() ? std::vector<uint16_t>{0} : x);
        ids.upload(b.ids.empty() ? std::vector<int32_t>{0} : b.ids);
        weights.upload(b.weights.empty() ? std::vector<float>{0} : b.weights);
    }
};

// The experts of `layer` on GPU g as the caller-owned arrays of set_expert_weights: w13 [S, 2I, H], w2 [S, H, I].
std::pair<std::vector<uint16_t>, std::vector<uint16_t>> packed_weights(const grace::LayerPlan& layer, int g,
                                                                       grace::ExpertShape shape) {
    const auto w = experts_of(layer, g, shape);
    const size_t HI = size_t(shape.hidden) * shape.intermediate;
    std::vector<uint16_t> w13, w2;
    for (const auto& e : w) {
        w13.insert(w13.end(), e.gate_bf16.begin(), e.gate_bf16.end());
        w13.insert(w13.end(), e.up_bf16.begin(), e.up_bf16.end());
        w2.insert(w2.end(), e.down_bf16.begin(), e.down_bf16.end());
        EXPECT_EQ(e.gate_bf16.size(), HI);
    }
    return {w13, w2};
}

// Per rank: layer A runs forward_device (legacy stream, synchronous), layer B (weightless constructor, the same
// weights given as device arrays) runs the phases on a stream of its own, twice, so router state carries. The
// outputs must be bit-identical; `split` also copies the received rows out, runs a LocalMoe of its own on them and
// combines that result (bit-identical where a row carries k records; flat pads its one record to k columns).
void phases_on_hub(const grace::Topology& topo, const Case& c, CommScheme scheme, RoutingPolicy policy, bool split) {
    const int G = topo.num_gpus();
    const auto layer = make_layer(c.E, topo);
    warm_experts(c.E, {c.H, c.I});
    grace::test::ThreadHub hub(G);
    std::vector<std::string> failures(G);
    std::vector<std::thread> threads;
    for (int r = 0; r < G; ++r)
        threads.emplace_back([&, r] {
            try {
                grace::test::HubCommunicator dc(hub, topo, r, grace::MemorySpace::kDevice);
                gc::GpuMoeLayerOptions go;
                go.scheme = scheme, go.policy = policy, go.routing_seed = 7;
                gc::GpuMoeLayer a(layer, topo, dc, experts_of(layer, r, {c.H, c.I}), go);
                gc::GpuMoeLayer b(layer, topo, dc, c.H, c.I, go);
                const auto [w13, w2] = packed_weights(layer, r, {c.H, c.I});
                gc::DeviceBuffer<uint16_t> d13, d2;
                d13.upload(w13.empty() ? std::vector<uint16_t>{0} : w13);
                d2.upload(w2.empty() ? std::vector<uint16_t>{0} : w2);
                b.set_expert_weights(d13.data(), d2.data());
                cudaStream_t stream = nullptr;
                CUDA_RUNTIME_CHECK(cudaStreamCreate(&stream));
                const int S = static_cast<int>(layer.gpu_experts[r].size());
                for (int call = 0; call < 2; ++call) {
                    const int T = c.T + call * 5 - r;
                    const Batch hb = make_batch(300 + 10 * call + r, T, c.k, c.E, c.H);
                    const DeviceBatch db(hb);
                    const size_t nh = size_t(T) * c.H;
                    gc::DeviceBuffer<float> out_a(std::max<size_t>(1, nh)), out_b(std::max<size_t>(1, nh));
                    const int64_t first = int64_t(call) * 1000 + int64_t(r) * T;
                    a.forward_device(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, out_a.data(), first);
                    const auto dest_a = a.last_dest_ranks();
                    bool exact = true;
                    if (!split) {
                        b.forward_async(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, out_b.data(),
                                        stream, first);
                    } else {
                        auto h = b.dispatch(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, stream, first);
                        const int64_t R = h.num_recv;
                        gc::DeviceBuffer<uint16_t> rx(std::max<int64_t>(1, R * c.H)), eo(std::max<int64_t>(1, R * c.H));
                        gc::DeviceBuffer<int32_t> rs(std::max<int64_t>(1, R * c.k));
                        gc::DeviceBuffer<float> rw(std::max<int64_t>(1, R * c.k));
                        b.received(h, rx.data(), rs.data(), rw.data(), stream);
                        if (R > 0) {
                            gc::LocalMoe moe({S, c.k, c.H, c.I}, static_cast<int>(R));
                            moe.set_weights(d13.data(), d2.data());
                            moe.forward(rx.data(), rs.data(), rw.data(), eo.data(), static_cast<int>(R), stream);
                        }
                        b.combine(h, eo.data(), out_b.data(), stream);
                        EXPECT_THROW(b.combine(h, eo.data(), out_b.data(), stream), grace::Error);  // consumed
                        exact = h.records == c.k;
                    }
                    CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
                    if (b.last_dest_ranks() != dest_a) failures[r] += grace::cat("call ", call, ": destinations; ");
                    const auto va = out_a.download(nh), vb = out_b.download(nh);
                    if (exact && va != vb) failures[r] += grace::cat("call ", call, ": outputs not bit-identical; ");
                    if (!exact && !(rel_l2(vb, va) <= 1e-3))
                        failures[r] += grace::cat("call ", call, ": rel L2 ", rel_l2(vb, va), "; ");
                }
                CUDA_RUNTIME_CHECK(cudaStreamDestroy(stream));
            } catch (const std::exception& e) {
                failures[r] += e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < G; ++r)
        EXPECT_EQ(failures[r], "") << "rank " << r << " " << grace::to_string(scheme) << " " << grace::to_string(policy)
                                   << (split ? " split" : " whole");
}

}  // namespace

TEST(GpuMoeLayerPhases, WholeLayerOnStreamIsBitIdenticalToForwardDevice) {
    REQUIRE_GPU();
    for (auto scheme : kSchemes)
        for (auto policy : {RoutingPolicy::kTar, RoutingPolicy::kVllm})
            phases_on_hub(grace::Topology{2, 2}, Case{16, 4, 64, 32, 40}, scheme, policy, false);
    phases_on_hub(grace::Topology{1, 4}, Case{16, 4, 64, 32, 33}, CommScheme::kHsc, RoutingPolicy::kWrr, false);
}

TEST(GpuMoeLayerPhases, ReceivedRowsThroughCallersExpertsThenCombine) {
    REQUIRE_GPU();
    for (auto scheme : kSchemes)
        phases_on_hub(grace::Topology{2, 2}, Case{16, 4, 64, 32, 40}, scheme, RoutingPolicy::kTar, true);
}

TEST(GpuMoeLayerPhases, OlmoeShapeOnStream) {
    REQUIRE_GPU();
    const auto& p = grace::find_expert_preset("olmoe");
    phases_on_hub(grace::Topology{2, 2}, Case{p.num_experts, 8, p.shape.hidden, p.shape.intermediate, 24},
                  CommScheme::kHsc, RoutingPolicy::kTar, false);
}

// The nccl communicator over a caller-given host communicator, 1x1: the phases match forward_device bit for bit;
// handle misuse and bad ids are refused with kInvalidArgument.
TEST(GpuMoeLayerPhases, NcclOverGivenHostCommunicator) {
    REQUIRE_GPU();
    if (grace::launched_process_count() != 1) GTEST_SKIP() << "1x1 test: run with one process";
    const grace::Topology topo{1, 1};
    std::shared_ptr<grace::Communicator> host = grace::make_communicator("local", {topo});
    EXPECT_THROW(gc::make_nccl_communicator({grace::Topology{1, 2}}, host), grace::Error);
    EXPECT_THROW(gc::make_nccl_communicator({topo}, nullptr), grace::Error);
    EXPECT_THROW(gc::make_nccl_communicator({topo}, host, 1 << 20), grace::Error);
    int device = 0;
    CUDA_RUNTIME_CHECK(cudaGetDevice(&device));
    auto nccl = gc::make_nccl_communicator({topo}, host, device);
    ASSERT_EQ(nccl->memory_space(), grace::MemorySpace::kDevice);
    const Case c{16, 4, 128, 64, 50};
    const auto layer = make_layer(c.E, topo);
    for (auto scheme : kSchemes) {
        gc::GpuMoeLayerOptions go;
        go.scheme = scheme;
        gc::GpuMoeLayer a(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        gc::GpuMoeLayer b(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        cudaStream_t stream = nullptr;
        CUDA_RUNTIME_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        const Batch hb = make_batch(9, c.T, c.k, c.E, c.H);
        const DeviceBatch db(hb);
        const size_t nh = size_t(c.T) * c.H;
        gc::DeviceBuffer<float> out_a(nh), out_b(nh);
        a.forward_device(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, out_a.data());
        b.forward_async(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, out_b.data(), stream);
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        EXPECT_EQ(out_a.download(nh), out_b.download(nh)) << grace::to_string(scheme);
        EXPECT_EQ(a.last_dest_ranks(), b.last_dest_ranks()) << grace::to_string(scheme);
        // One GPU, hsc or flat-dedup: forward_async is the local expert layer alone (no exchange stages).
        if (scheme != grace::CommScheme::kFlat) {
            EXPECT_EQ(b.last_stats().layout_s, 0.0);
            EXPECT_EQ(b.last_stats().dispatch_s, 0.0);
        }
        // A general-path call after it (split phases, another batch) reports its own destinations.
        {
            const Batch hb2 = make_batch(17, c.T, c.k, c.E, c.H);
            const DeviceBatch db2(hb2);
            a.forward_device(db2.hidden.data(), db2.ids.data(), db2.weights.data(), c.T, c.k, out_a.data());
            auto h = b.dispatch(db2.hidden.data(), db2.ids.data(), db2.weights.data(), c.T, c.k, stream);
            b.experts(h, stream);
            b.combine(h, nullptr, out_b.data(), stream);
            CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
            EXPECT_EQ(a.last_dest_ranks(), b.last_dest_ranks()) << grace::to_string(scheme);
            EXPECT_EQ(out_a.download(nh), out_b.download(nh)) << grace::to_string(scheme);
        }
        // A stale handle (a later dispatch replaced it) and a second combine are refused.
        auto h1 = b.dispatch(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, stream);
        auto h2 = b.dispatch(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, stream);
        EXPECT_THROW(b.combine(h1, nullptr, out_b.data(), stream), grace::Error);
        b.experts(h2, stream);
        b.combine(h2, nullptr, out_b.data(), stream);
        EXPECT_THROW(b.combine(h2, nullptr, out_b.data(), stream), grace::Error);
        // An expert id >= E.
        auto bad = hb.ids;
        bad[3] = c.E;
        gc::DeviceBuffer<int32_t> d_bad;
        d_bad.upload(bad);
        try {
            b.dispatch(db.hidden.data(), d_bad.data(), db.weights.data(), c.T, c.k, stream);
            ADD_FAILURE() << "no error for an expert id of E";
        } catch (const grace::Error& e) {
            EXPECT_EQ(e.code(), grace::ErrorCode::kInvalidArgument);
            EXPECT_NE(std::string(e.what()).find("outside [0, 16)"), std::string::npos) << e.what();
        }
        // int64 ids (torch's index dtype, narrowed on the device): the same output as int32 ids on a fresh layer
        // (same router state); values < -1 count as none like -1; an id of 2^40 is refused naming that value.
        {
            gc::GpuMoeLayer c32(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
            gc::GpuMoeLayer c64(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
            std::vector<int64_t> ids64(hb.ids.begin(), hb.ids.end());
            auto ids32 = hb.ids;
            ids64[5] = -7, ids32[5] = -1;
            gc::DeviceBuffer<int64_t> d64;
            d64.upload(ids64);
            gc::DeviceBuffer<int32_t> d32;
            d32.upload(ids32);
            gc::DeviceBuffer<float> out_32(nh), out_64(nh);
            for (int rep = 0; rep < 2; ++rep) {  // the second call: router offsets carried the same way
                c32.forward_async(db.hidden.data(), d32.data(), db.weights.data(), c.T, c.k, out_32.data(), stream);
                c64.forward_async(db.hidden.data(), d64.data(), db.weights.data(), c.T, c.k, out_64.data(), stream);
                CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
                EXPECT_EQ(out_32.download(nh), out_64.download(nh)) << grace::to_string(scheme) << " rep " << rep;
                EXPECT_EQ(c32.last_dest_ranks(), c64.last_dest_ranks());
            }
            ids64[7] = int64_t{1} << 40;
            d64.upload(ids64);
            try {
                c64.forward_async(db.hidden.data(), d64.data(), db.weights.data(), c.T, c.k, out_64.data(), stream);
                ADD_FAILURE() << "no error for an int64 expert id of 2^40";
            } catch (const grace::Error& e) {
                EXPECT_EQ(e.code(), grace::ErrorCode::kInvalidArgument);
                EXPECT_NE(std::string(e.what()).find("= 1099511627776 is outside [0, 16)"), std::string::npos)
                    << e.what();
            }
        }
        // A call on a capturing stream is refused before it queues anything: the capture stays valid (and empty).
        {
            CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
            CUDA_RUNTIME_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            bool refused = false;
            try {
                b.forward_async(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, out_b.data(), stream);
            } catch (const grace::Error& e) {
                refused = e.code() == grace::ErrorCode::kInvalidArgument &&
                          std::string(e.what()).find("CUDA graph") != std::string::npos;
            }
            cudaGraph_t graph = nullptr;
            EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
            EXPECT_TRUE(refused);
            if (graph) cudaGraphDestroy(graph);
            // The layer is usable afterwards.
            b.forward_async(db.hidden.data(), db.ids.data(), db.weights.data(), c.T, c.k, out_b.data(), stream);
        }
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        CUDA_RUNTIME_CHECK(cudaStreamDestroy(stream));
    }
}

// One GPU as a 1x1 group: the NCCL communicator over a local host communicator, and a non-blocking stream
// (destroyed with it, also when a test stops early).
struct OneGpu {
    grace::Topology topo{1, 1};
    std::shared_ptr<grace::Communicator> host = grace::make_communicator("local", {topo});
    std::unique_ptr<grace::Communicator> nccl;
    cudaStream_t stream = nullptr;
    OneGpu() {
        int device = 0;
        CUDA_RUNTIME_CHECK(cudaGetDevice(&device));
        nccl = gc::make_nccl_communicator({topo}, host, device);
        CUDA_RUNTIME_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    }
    ~OneGpu() {
        if (stream) cudaStreamDestroy(stream);
    }
    OneGpu(const OneGpu&) = delete;
    OneGpu& operator=(const OneGpu&) = delete;
};

// set_host_id_check(false) on one GPU: calls queued back to back with no host wait (T grows between them, so the
// pinned slot copy is reallocated behind in-flight copies) give the same outputs and destinations as the checked
// layer; an id >= E then selects no expert (the output of the same batch with -1 there) instead of throwing. The
// flat scheme (no one-GPU path) still refuses it.
TEST(GpuMoeLayerPhases, OneGpuWithoutHostIdCheck) {
    REQUIRE_GPU();
    if (grace::launched_process_count() != 1) GTEST_SKIP() << "1x1 test: run with one process";
    const OneGpu one;
    const grace::Topology& topo = one.topo;
    const auto& nccl = one.nccl;
    cudaStream_t stream = one.stream;
    const Case c{16, 4, 128, 64, 50};
    const auto layer = make_layer(c.E, topo);
    for (auto scheme : kSchemes) {
        SCOPED_TRACE(grace::to_string(scheme));
        gc::GpuMoeLayerOptions go;
        go.scheme = scheme;
        gc::GpuMoeLayer checked(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        gc::GpuMoeLayer unchecked(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        unchecked.set_host_id_check(false);
        const int Ts[3] = {c.T, 4 * c.T, c.T + 3};
        std::vector<Batch> batches;
        std::vector<std::unique_ptr<DeviceBatch>> dbs;
        std::vector<std::unique_ptr<gc::DeviceBuffer<float>>> outs;
        for (int i = 0; i < 3; ++i) {
            batches.push_back(make_batch(30 + i, Ts[i], c.k, c.E, c.H));
            dbs.push_back(std::make_unique<DeviceBatch>(batches.back()));
            outs.push_back(std::make_unique<gc::DeviceBuffer<float>>(size_t(Ts[i]) * c.H));
        }
        for (int i = 0; i < 3; ++i)  // no synchronization between the calls
            unchecked.forward_async(dbs[i]->hidden.data(), dbs[i]->ids.data(), dbs[i]->weights.data(), Ts[i], c.k,
                                    outs[i]->data(), stream);
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        const auto unchecked_dest = unchecked.last_dest_ranks();
        for (int i = 0; i < 3; ++i) {
            const size_t nh = size_t(Ts[i]) * c.H;
            const auto got = outs[i]->download(nh);
            gc::DeviceBuffer<float> ref(nh);
            checked.forward_async(dbs[i]->hidden.data(), dbs[i]->ids.data(), dbs[i]->weights.data(), Ts[i], c.k,
                                  ref.data(), stream);
            CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
            EXPECT_EQ(got, ref.download(nh)) << "call " << i;
        }
        EXPECT_EQ(unchecked_dest, checked.last_dest_ranks());
        // An expert id of E at selection 3.
        auto bad = batches[0].ids, masked = batches[0].ids;
        bad[3] = c.E, masked[3] = -1;
        gc::DeviceBuffer<int32_t> d_bad, d_masked;
        d_bad.upload(bad);
        d_masked.upload(masked);
        const size_t nh = size_t(c.T) * c.H;
        gc::DeviceBuffer<float> out_bad(nh), out_masked(nh);
        if (scheme == grace::CommScheme::kFlat) {
            EXPECT_THROW(unchecked.forward_async(dbs[0]->hidden.data(), d_bad.data(), dbs[0]->weights.data(), c.T,
                                                 c.k, out_bad.data(), stream),
                         grace::Error);
            continue;
        }
        unchecked.forward_async(dbs[0]->hidden.data(), d_bad.data(), dbs[0]->weights.data(), c.T, c.k,
                                out_bad.data(), stream);
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        // Pointers off the 16-byte grid are refused, not faulted on.
        EXPECT_THROW(unchecked.forward_async(reinterpret_cast<const char*>(dbs[0]->hidden.data()) + 2, d_bad.data(),
                                             dbs[0]->weights.data(), c.T, c.k, out_bad.data(), stream),
                     grace::Error);
        EXPECT_THROW(unchecked.forward_async(dbs[0]->hidden.data(), d_bad.data(), dbs[0]->weights.data(), c.T, c.k,
                                             out_bad.data() + 1, stream),
                     grace::Error);
        const auto bad_dest = unchecked.last_dest_ranks();
        ASSERT_EQ(bad_dest.size(), bad.size());
        EXPECT_EQ(bad_dest[3], -1);
        checked.forward_async(dbs[0]->hidden.data(), d_masked.data(), dbs[0]->weights.data(), c.T, c.k,
                              out_masked.data(), stream);
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        EXPECT_EQ(out_bad.download(nh), out_masked.download(nh));
        EXPECT_EQ(bad_dest, checked.last_dest_ranks());
    }
}

namespace {

// Captures what `queue` queues on `stream` and instantiates it; a call refused inside returns nullptr, its message
// in `why`, after checking that the capture still ends valid and holds nothing.
cudaGraphExec_t capture_call(cudaStream_t stream, const std::function<void()>& queue, std::string& why) {
    CUDA_RUNTIME_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));  // torch.cuda.graph's mode
    why.clear();
    try {
        queue();
    } catch (const grace::Error& e) {
        EXPECT_EQ(e.code(), grace::ErrorCode::kInvalidArgument) << e.what();
        why = e.what();
        if (why.empty()) why = "?";
    }
    cudaGraph_t graph = nullptr;
    EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    if (graph && why.empty()) CUDA_RUNTIME_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    if (graph && !why.empty()) {
        size_t nodes = 0;
        CUDA_RUNTIME_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
        EXPECT_EQ(nodes, 0u) << "a refused call queued work: " << why;
    }
    if (graph) cudaGraphDestroy(graph);
    return exec;
}

// Writes batch b into the device buffers of d (the pointers a graph captured), as bf16 / int32 or int64 / float.
void write_batch(const Batch& b, DeviceBatch& d, gc::DeviceBuffer<int64_t>* ids64) {
    std::vector<uint16_t> x(b.hidden.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = gc::float_to_bf16(b.hidden[i]);
    CUDA_RUNTIME_CHECK(cudaMemcpy(d.hidden.data(), x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CUDA_RUNTIME_CHECK(cudaMemcpy(d.ids.data(), b.ids.data(), b.ids.size() * 4, cudaMemcpyHostToDevice));
    CUDA_RUNTIME_CHECK(cudaMemcpy(d.weights.data(), b.weights.data(), b.weights.size() * 4, cudaMemcpyHostToDevice));
    if (ids64) {
        const std::vector<int64_t> wide(b.ids.begin(), b.ids.end());
        CUDA_RUNTIME_CHECK(cudaMemcpy(ids64->data(), wide.data(), wide.size() * 8, cudaMemcpyHostToDevice));
    }
}

}  // namespace

// The one-GPU path without the host id check, captured in a CUDA graph: each replay, on new inputs written into
// the captured buffers, gives bit for bit what an uncaptured layer gives on them (int32 ids with hsc, int64 with
// flat-dedup), also after a larger uncaptured call grew the shared buffers between replays (the graph's stay
// alive). Refused before anything is queued, the capture ending valid and empty: before any uncaptured call (no
// buffers yet), at more tokens than the buffers hold, with the host id check on, and on the flat scheme (the
// general path). last_dest_ranks after a captured call throws. Needs the sm90 GEMM (the cuBLAS ones read counts on
// the host).
TEST(GpuMoeLayerPhases, OneGpuCapturedInACudaGraph) {
    REQUIRE_GPU();
    if (grace::launched_process_count() != 1) GTEST_SKIP() << "1x1 test: run with one process";
    if (!gc::sm90_gemm_available()) GTEST_SKIP() << "capture needs the sm90 GEMM (compute capability 9.0)";
    const OneGpu one;
    const grace::Topology& topo = one.topo;
    const auto& nccl = one.nccl;
    cudaStream_t stream = one.stream;
    const Case c{16, 4, 128, 128, 50};
    const auto layer = make_layer(c.E, topo);
    const size_t nh = size_t(c.T) * c.H;
    for (auto scheme : kSchemes) {
        SCOPED_TRACE(grace::to_string(scheme));
        gc::GpuMoeLayerOptions go;
        go.scheme = scheme;
        gc::GpuMoeLayer graphed(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        gc::GpuMoeLayer eager(layer, topo, *nccl, experts_of(layer, 0, {c.H, c.I}), go);
        graphed.set_host_id_check(false);
        eager.set_host_id_check(false);
        const bool wide = scheme == grace::CommScheme::kFlatDedup;
        DeviceBatch in(make_batch(60, c.T, c.k, c.E, c.H));
        gc::DeviceBuffer<int64_t> in64(size_t(c.T) * c.k);
        write_batch(make_batch(60, c.T, c.k, c.E, c.H), in, &in64);
        gc::DeviceBuffer<float> out(nh), ref(nh);
        auto call = [&](gc::GpuMoeLayer& l, int T, float* o) {
            if (wide)
                l.forward_async(in.hidden.data(), in64.data(), in.weights.data(), T, c.k, o, stream);
            else
                l.forward_async(in.hidden.data(), in.ids.data(), in.weights.data(), T, c.k, o, stream);
        };
        std::string why;
        if (scheme == grace::CommScheme::kFlat) {
            EXPECT_EQ(capture_call(stream, [&] { call(graphed, c.T, out.data()); }, why), nullptr);
            EXPECT_NE(why.find("dispatch layout is planned on the host"), std::string::npos) << why;
            continue;
        }
        EXPECT_EQ(capture_call(stream, [&] { call(graphed, c.T, out.data()); }, why), nullptr);
        EXPECT_NE(why.find("make one uncaptured call with at least 50 tokens"), std::string::npos) << why;
        call(graphed, c.T, out.data());  // the uncaptured call that sizes the buffers
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        cudaGraphExec_t exec = capture_call(stream, [&] { call(graphed, c.T, out.data()); }, why);
        ASSERT_NE(exec, nullptr) << why;
        EXPECT_THROW(graphed.last_dest_ranks(), grace::Error);
        for (int rep = 0; rep < 3; ++rep) {
            write_batch(make_batch(61 + rep, c.T, c.k, c.E, c.H), in, &in64);
            CUDA_RUNTIME_CHECK(cudaMemset(out.data(), 0xff, out.bytes()));
            CUDA_RUNTIME_CHECK(cudaGraphLaunch(exec, stream));
            CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
            call(eager, c.T, ref.data());
            CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
            EXPECT_EQ(out.download(nh), ref.download(nh)) << "replay " << rep;
            if (rep == 0) {
                // An uncaptured call with 4x the tokens grows the slots and the LocalMoe between replays.
                const Batch big = make_batch(70, 4 * c.T, c.k, c.E, c.H);
                DeviceBatch dbig(big);
                gc::DeviceBuffer<float> obig(4 * nh), rbig(4 * nh);
                graphed.forward_async(dbig.hidden.data(), dbig.ids.data(), dbig.weights.data(), 4 * c.T, c.k,
                                      obig.data(), stream);
                eager.forward_async(dbig.hidden.data(), dbig.ids.data(), dbig.weights.data(), 4 * c.T, c.k,
                                    rbig.data(), stream);
                CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
                EXPECT_EQ(obig.download(4 * nh), rbig.download(4 * nh));
                EXPECT_EQ(graphed.last_dest_ranks(), eager.last_dest_ranks());
            }
        }
        CUDA_RUNTIME_CHECK(cudaGraphExecDestroy(exec));
        // More tokens than the buffers hold (4T after the call above): refused.
        {
            DeviceBatch dhuge(make_batch(71, 5 * c.T, c.k, c.E, c.H));
            gc::DeviceBuffer<float> ohuge(5 * nh);
            EXPECT_EQ(capture_call(stream,
                                   [&] {
                                       graphed.forward_async(dhuge.hidden.data(), dhuge.ids.data(),
                                                             dhuge.weights.data(), 5 * c.T, c.k, ohuge.data(), stream);
                                   },
                                   why),
                      nullptr);
            EXPECT_NE(why.find("at least 250 tokens"), std::string::npos) << why;
        }
        // With the host id check on: refused, naming the check.
        graphed.set_host_id_check(true);
        EXPECT_EQ(capture_call(stream, [&] { call(graphed, c.T, out.data()); }, why), nullptr);
        EXPECT_NE(why.find("range check waits on the host"), std::string::npos) << why;
        // The layer still works uncaptured afterwards (and checks the ids again).
        write_batch(make_batch(80, c.T, c.k, c.E, c.H), in, &in64);
        call(graphed, c.T, out.data());
        call(eager, c.T, ref.data());
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
        EXPECT_EQ(out.download(nh), ref.download(nh));
        EXPECT_EQ(graphed.last_dest_ranks(), eager.last_dest_ranks());
    }
}

// ---- A GpuWorkspace shared by two layers ----
namespace {

// Per rank (2x2 over the hub): layers 0 and 1 (other shapes: the shared buffers and LocalMoe are resized and
// rebuilt between them) sharing one workspace, against the same two layers with workspaces of their own. Calls
// alternate between the layers with changing T, through forward_async, the split phases and forward_device; the
// outputs and destinations must be bit-identical. While layer 0's dispatch is open, layer 1's dispatch and
// forward_device are refused naming both layers, and leave no trace (the next calls still match).
void shared_workspace_on_hub(CommScheme scheme) {
    const grace::Topology topo{2, 2};
    const int G = topo.num_gpus();
    const Case ca{16, 4, 64, 32, 40}, cb{16, 4, 128, 48, 40};
    auto layer_a = make_layer(ca.E, topo), layer_b = make_layer(cb.E, topo);
    layer_a.layer = 0, layer_b.layer = 1;
    warm_experts(ca.E, {ca.H, ca.I});
    warm_experts(cb.E, {cb.H, cb.I});
    grace::test::ThreadHub hub(G);
    std::vector<std::string> failures(G);
    std::vector<std::thread> threads;
    for (int r = 0; r < G; ++r)
        threads.emplace_back([&, r] {
            try {
                grace::test::HubCommunicator dc(hub, topo, r, grace::MemorySpace::kDevice);
                auto shared = std::make_shared<gc::GpuWorkspace>();
                auto own_a = std::make_shared<gc::GpuWorkspace>(), own_b = std::make_shared<gc::GpuWorkspace>();
                gc::GpuMoeLayerOptions go;
                go.scheme = scheme, go.policy = RoutingPolicy::kTar;
                auto with = [&](std::shared_ptr<gc::GpuWorkspace> w) {
                    gc::GpuMoeLayerOptions o = go;
                    o.workspace = std::move(w);
                    return o;
                };
                gc::GpuMoeLayer sa(layer_a, topo, dc, experts_of(layer_a, r, {ca.H, ca.I}), with(shared));
                gc::GpuMoeLayer sb(layer_b, topo, dc, experts_of(layer_b, r, {cb.H, cb.I}), with(shared));
                gc::GpuMoeLayer oa(layer_a, topo, dc, experts_of(layer_a, r, {ca.H, ca.I}), with(own_a));
                gc::GpuMoeLayer ob(layer_b, topo, dc, experts_of(layer_b, r, {cb.H, cb.I}), with(own_b));
                cudaStream_t stream = nullptr;
                CUDA_RUNTIME_CHECK(cudaStreamCreate(&stream));
                const int Ts[] = {40, 7, 90, 0, 23, 64};
                for (int call = 0; call < 6; ++call) {
                    const bool on_a = call % 2 == 0;
                    const Case& c = on_a ? ca : cb;
                    gc::GpuMoeLayer& s = on_a ? sa : sb;
                    gc::GpuMoeLayer& o = on_a ? oa : ob;
                    const int T = std::max(0, Ts[call] - r);
                    const Batch hb = make_batch(700 + 10 * call + r, T, c.k, c.E, c.H);
                    const DeviceBatch db(hb);
                    const size_t nh = size_t(T) * c.H;
                    gc::DeviceBuffer<float> out_s(std::max<size_t>(1, nh)), out_o(std::max<size_t>(1, nh));
                    const int mode = call % 3;  // 0: forward_async, 1: split phases, 2: forward_device
                    for (gc::GpuMoeLayer* l : {&s, &o}) {
                        float* out = l == &s ? out_s.data() : out_o.data();
                        if (mode == 0) {
                            l->forward_async(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, out, stream);
                        } else if (mode == 1) {
                            auto h = l->dispatch(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, stream);
                            l->experts(h, stream);
                            l->combine(h, nullptr, out, stream);
                        } else {
                            l->forward_device(db.hidden.data(), db.ids.data(), db.weights.data(), T, c.k, out);
                        }
                        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
                    }
                    if (s.last_dest_ranks() != o.last_dest_ranks())
                        failures[r] += grace::cat("call ", call, ": destinations differ; ");
                    if (out_s.download(nh) != out_o.download(nh))
                        failures[r] += grace::cat("call ", call, ": shared-workspace output not bit-identical; ");
                    if (shared->in_use()) failures[r] += grace::cat("call ", call, ": workspace still in use; ");
                }
                if (!(shared->buffer_bytes() < own_a->buffer_bytes() + own_b->buffer_bytes()))
                    failures[r] +=
                        grace::cat("shared workspace holds ", shared->buffer_bytes(), " bytes, the own ones ",
                                   own_a->buffer_bytes(), " + ", own_b->buffer_bytes(), "; ");

                // Layer 0's handle outstanding: layer 1 is refused (every rank, before any exchange).
                const Batch ha = make_batch(900 + r, 30, ca.k, ca.E, ca.H),
                            hbb = make_batch(950 + r, 30, cb.k, cb.E, cb.H);
                const DeviceBatch da(ha), dbb(hbb);
                gc::DeviceBuffer<float> out_s(30 * cb.H), out_o(30 * cb.H);
                auto h = sa.dispatch(da.hidden.data(), da.ids.data(), da.weights.data(), 30, ca.k, stream);
                if (!shared->in_use()) failures[r] += "workspace not in use during a dispatch; ";
                for (int attempt = 0; attempt < 2; ++attempt) {
                    try {
                        if (attempt == 0)
                            sb.dispatch(dbb.hidden.data(), dbb.ids.data(), dbb.weights.data(), 30, cb.k, stream);
                        else
                            sb.forward_device(dbb.hidden.data(), dbb.ids.data(), dbb.weights.data(), 30, cb.k,
                                              out_s.data());
                        failures[r] += grace::cat("attempt ", attempt, ": no error while layer 0's handle is open; ");
                    } catch (const grace::Error& e) {
                        const std::string what = e.what();
                        if (e.code() != grace::ErrorCode::kInvalidArgument ||
                            what.find("layer 1 on rank " + std::to_string(r)) == std::string::npos ||
                            what.find("in use by layer 0 on rank " + std::to_string(r)) == std::string::npos)
                            failures[r] += grace::cat("attempt ", attempt, ": unexpected error: ", what, "; ");
                    }
                }
                sa.experts(h, stream);
                sa.combine(h, nullptr, out_o.data(), stream);
                // Layer 1 runs again and still matches its twin (the refused calls left its router untouched).
                sb.forward_async(dbb.hidden.data(), dbb.ids.data(), dbb.weights.data(), 30, cb.k, out_s.data(), stream);
                ob.forward_async(dbb.hidden.data(), dbb.ids.data(), dbb.weights.data(), 30, cb.k, out_o.data(), stream);
                CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));
                if (out_s.download() != out_o.download() || sb.last_dest_ranks() != ob.last_dest_ranks())
                    failures[r] += "layer 1 after the refused calls differs from its twin; ";
                CUDA_RUNTIME_CHECK(cudaStreamDestroy(stream));
            } catch (const std::exception& e) {
                failures[r] += e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < G; ++r) EXPECT_EQ(failures[r], "") << "rank " << r << " " << grace::to_string(scheme);
}

}  // namespace

TEST(GpuWorkspace, SharedByTwoLayersBitIdenticalAndRefusesAnOpenHandle) {
    REQUIRE_GPU();
    for (auto scheme : kSchemes) shared_workspace_on_hub(scheme);
}

TEST(GpuWorkspace, ConstructionDoesNoCudaWork) {
    // No device needed: an unused workspace holds nothing and is free.
    gc::GpuWorkspace w;
    EXPECT_EQ(w.buffer_bytes(), 0u);
    EXPECT_FALSE(w.in_use());
}
