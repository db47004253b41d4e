// The local expert layer on one GPU: permute -> grouped GEMM gate+up -> SiLU*up -> grouped GEMM down -> unpermute.
#include <cuda_bf16.h>

#include <algorithm>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "grace/cuda_moe.hpp"
#include "grouped_gemm_sm90.hpp"
#include "sort_kernels.cuh"

namespace grace::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kVec = 8;  // bf16 per 16-byte access

// pos[p] = row of selection p in the expert-sorted order (-1 when masked).
__global__ void position_kernel(const int32_t* __restrict__ keys, int64_t n, int num_keys,
                                const int32_t* __restrict__ local_rank, const int32_t* __restrict__ block_prefix,
                                const int32_t* __restrict__ seg_start, int32_t* __restrict__ pos) {
    const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (p >= n) return;
    const int e = keys[p];
    pos[p] = (e < 0 || e >= num_keys)
                 ? -1
                 : seg_start[e] + block_prefix[(p / detail::kSortItems) * num_keys + e] + local_rank[p];
}

// One warp per selection: copies x[t] into xp[pos[p]] with 16-byte accesses.
__global__ void permute_kernel(const uint4* __restrict__ x, const int32_t* __restrict__ pos, int64_t n, int top_k,
                               int hidden_vec, uint4* __restrict__ xp) {
    const int64_t p = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (p >= n) return;
    const int row = pos[p];
    if (row < 0) return;
    const uint4* src = x + (p / top_k) * hidden_vec;
    uint4* dst = xp + static_cast<int64_t>(row) * hidden_vec;
    for (int c = threadIdx.x & 31; c < hidden_vec; c += 32) dst[c] = __ldg(src + c);
}

// a[r, c] = silu(y1[r, c]) * y1[r, I + c], fp32 math, 8 columns per thread.
__global__ void silu_mul_kernel(const uint4* __restrict__ y1, int64_t rows, int inter_vec, uint4* __restrict__ a) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= rows * inter_vec) return;
    const int64_t r = i / inter_vec;
    const int c = static_cast<int>(i % inter_vec);
    const uint4 g4 = y1[r * 2 * inter_vec + c];
    const uint4 u4 = y1[r * 2 * inter_vec + inter_vec + c];
    const bf16* g = reinterpret_cast<const bf16*>(&g4);
    const bf16* u = reinterpret_cast<const bf16*>(&u4);
    uint4 o4;
    bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
        const float gf = __bfloat162float(g[v]);
        o[v] = __float2bfloat16(gf / (1.0f + __expf(-gf)) * __bfloat162float(u[v]));
    }
    a[i] = o4;
}

// out[t] = sum_j w[t, j] * y2[pos[t, j]], fp32 accumulation rounded to bf16; one block per token, 8 columns per
// thread. Out = bf16, or float (the rounded sum widened: forward_f32's output without a separate widening pass).
template <typename Out>
__global__ void unpermute_kernel(const uint4* __restrict__ y2, const int32_t* __restrict__ pos,
                                 const float* __restrict__ weights, int top_k, int hidden_vec, Out* __restrict__ out) {
    const int64_t t = blockIdx.x;
    for (int c = threadIdx.x; c < hidden_vec; c += blockDim.x) {
        float acc[kVec] = {};
        for (int j = 0; j < top_k; ++j) {
            const int row = __ldg(pos + t * top_k + j);
            if (row < 0) continue;
            const float w = __ldg(weights + t * top_k + j);
            const uint4 v4 = __ldg(y2 + static_cast<int64_t>(row) * hidden_vec + c);
            const bf16* v = reinterpret_cast<const bf16*>(&v4);
#pragma unroll
            for (int q = 0; q < kVec; ++q) acc[q] += w * __bfloat162float(v[q]);
        }
        uint4 o4;
        bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
        for (int q = 0; q < kVec; ++q) o[q] = __float2bfloat16(acc[q]);
        if constexpr (sizeof(Out) == sizeof(uint4)) {
            out[t * hidden_vec + c] = o4;
        } else {  // float4 pairs: the rounded values widened
            float4* dst = reinterpret_cast<float4*>(out) + (t * hidden_vec + c) * 2;
            dst[0] = make_float4(__bfloat162float(o[0]), __bfloat162float(o[1]), __bfloat162float(o[2]),
                                 __bfloat162float(o[3]));
            dst[1] = make_float4(__bfloat162float(o[4]), __bfloat162float(o[5]), __bfloat162float(o[6]),
                                 __bfloat162float(o[7]));
        }
    }
}

}  // namespace

bool sm90_gemm_available() {
    int device = 0;
    return device_available() && cudaGetDevice(&device) == cudaSuccess && detail::sm90_grouped_gemm_available(device);
}

struct LocalMoe::Impl {
    LocalMoeShape shape;
    int max_tokens = 0;
    GroupedGemmBackend backend;
    cublasHandle_t handle = nullptr;
    const bf16* w13 = nullptr;
    const bf16* w2 = nullptr;
    DeviceBuffer<int32_t> local_rank, hist, totals, seg_start, pos, tile_start;
    DeviceBuffer<bf16> xp, y1, act, y2;
    DeviceBuffer<const void*> d_ptrs;  // [6][E]: A, B, C of the up GEMM, then of the down GEMM
    const void** h_ptrs = nullptr;     // pinned mirror of d_ptrs
    int32_t* h_seg = nullptr;          // pinned [E + 1]
    std::vector<int32_t> counts;
    bool counts_pending = false;  // kSm90: h_seg is still on its way (counts_ready marks its arrival)
    bool counts_captured = false;  // the last forward was captured in a CUDA graph: its counts never reach the host
    int64_t last_selections = 0;  // T * k of the last forward: the row bound of rerun_experts
    cudaEvent_t counts_ready = nullptr;
    bool profiling = false;
    int hybrid_threshold = 512;  // bench/results/gpu.md, threshold sweep
    cudaEvent_t ev[7] = {};
    LocalMoeTimings timings;

    void forward(const void* x, const int32_t* topk_idx, const float* topk_weights, void* out, bool out_f32,
                 int num_tokens, void* stream);
    void gemm(int which, const std::vector<int>& experts, cudaStream_t stream);
    void sm90_up(cudaStream_t stream) const;
    void sm90_down(cudaStream_t stream) const;
    void fill_counts();
    GroupedGemmBackend resolve(GroupedGemmBackend b) const;
};

GroupedGemmBackend LocalMoe::Impl::resolve(GroupedGemmBackend b) const {
    if (b != GroupedGemmBackend::kAuto && b != GroupedGemmBackend::kSm90) return b;
    const bool fits = detail::sm90_grouped_gemm_fits(shape.hidden, shape.intermediate);
    const bool runs = sm90_gemm_available();
    if (b == GroupedGemmBackend::kAuto) return fits && runs ? GroupedGemmBackend::kSm90 : GroupedGemmBackend::kHybrid;
    GRACE_CHECK(runs, ErrorCode::kUnsupported,
                "LocalMoe: the sm90 GEMM backend needs a compute capability 9.0 GPU (H100/H200)");
    GRACE_CHECK(fits, ErrorCode::kUnsupported, "LocalMoe: the sm90 GEMM backend needs intermediate % 128 == 0, got ",
                shape.intermediate);
    return b;
}

void LocalMoe::Impl::sm90_up(cudaStream_t stream) const {
    detail::sm90_gemm_up_swiglu(xp.data(), w13, act.data(), seg_start.data(), tile_start.data(), shape.num_experts,
                                shape.hidden, shape.intermediate, static_cast<int64_t>(max_tokens) * shape.top_k,
                                last_selections, stream);
}
void LocalMoe::Impl::sm90_down(cudaStream_t stream) const {
    detail::sm90_gemm_down(act.data(), w2, y2.data(), seg_start.data(), tile_start.data(), shape.num_experts,
                           shape.hidden, shape.intermediate, static_cast<int64_t>(max_tokens) * shape.top_k,
                           last_selections, stream);
}
void LocalMoe::Impl::fill_counts() {
    GRACE_CHECK_ARG(!counts_captured, "LocalMoe: the last forward was captured in a CUDA graph; its per-expert "
                    "counts are not copied to the host");
    if (!counts_pending) return;
    CUDA_RUNTIME_CHECK(cudaEventSynchronize(counts_ready));
    for (int e = 0; e < shape.num_experts; ++e) counts[e] = h_seg[e + 1] - h_seg[e];
    counts_pending = false;
}

LocalMoe::LocalMoe(const LocalMoeShape& shape, int max_tokens, GroupedGemmBackend backend)
    : impl_(std::make_unique<Impl>()) {
    GRACE_CHECK_ARG(shape.num_experts >= 1 && shape.num_experts <= detail::kMaxKeys, "LocalMoe: num_experts ",
                    shape.num_experts, " outside [1, ", detail::kMaxKeys, "]");
    GRACE_CHECK_ARG(shape.top_k >= 1, "LocalMoe: top_k ", shape.top_k);
    GRACE_CHECK_ARG(shape.hidden > 0 && shape.hidden % kVec == 0, "LocalMoe: hidden ", shape.hidden,
                    " must be a positive multiple of 8");
    GRACE_CHECK_ARG(shape.intermediate > 0 && shape.intermediate % kVec == 0, "LocalMoe: intermediate ",
                    shape.intermediate, " must be a positive multiple of 8");
    GRACE_CHECK_ARG(max_tokens >= 1, "LocalMoe: max_tokens ", max_tokens);
    auto& m = *impl_;
    m.shape = shape;
    m.max_tokens = max_tokens;
    m.backend = m.resolve(backend);
    const int E = shape.num_experts;
    const size_t n = static_cast<size_t>(max_tokens) * shape.top_k;
    m.local_rank.resize(n);
    m.hist.resize(static_cast<size_t>(detail::sort_num_blocks(n)) * E);
    m.totals.resize(E);
    m.seg_start.resize(E + 1);
    m.tile_start.resize(E + 1);
    m.pos.resize(n);
    m.xp.resize(n * shape.hidden);
    if (m.backend != GroupedGemmBackend::kSm90) m.y1.resize(n * 2 * shape.intermediate);  // kSm90 fuses it away
    m.act.resize(n * shape.intermediate);
    m.y2.resize(n * shape.hidden);
    m.d_ptrs.resize(6 * static_cast<size_t>(E));
    CUDA_RUNTIME_CHECK(cudaMallocHost(reinterpret_cast<void**>(&m.h_ptrs), sizeof(void*) * 6 * E));
    CUDA_RUNTIME_CHECK(cudaMallocHost(reinterpret_cast<void**>(&m.h_seg), sizeof(int32_t) * (E + 1)));
    CUBLAS_CHECK(cublasCreate(&m.handle));
    for (auto& e : m.ev) CUDA_RUNTIME_CHECK(cudaEventCreate(&e));
    CUDA_RUNTIME_CHECK(cudaEventCreateWithFlags(&m.counts_ready, cudaEventDisableTiming));
}

LocalMoe::~LocalMoe() {
    auto& m = *impl_;
    for (auto& e : m.ev) cudaEventDestroy(e);
    if (m.counts_ready) cudaEventDestroy(m.counts_ready);
    if (m.handle) cublasDestroy(m.handle);
    cudaFreeHost(m.h_ptrs);
    cudaFreeHost(m.h_seg);
}

void LocalMoe::set_weights(const void* w13, const void* w2) {
    GRACE_CHECK_ARG(aligned16(w13) && aligned16(w2),
                    "LocalMoe::set_weights: w13 and w2 must start on 16-byte boundaries (the GEMMs load them by TMA)");
    impl_->w13 = static_cast<const bf16*>(w13);
    impl_->w2 = static_cast<const bf16*>(w2);
}
void LocalMoe::set_profiling(bool on) { impl_->profiling = on; }
const LocalMoeTimings& LocalMoe::last_timings() const { return impl_->timings; }
const std::vector<int32_t>& LocalMoe::last_counts() const {
    impl_->fill_counts();
    return impl_->counts;
}
GroupedGemmBackend LocalMoe::backend() const { return impl_->backend; }
void LocalMoe::set_backend(GroupedGemmBackend backend) { impl_->backend = impl_->resolve(backend); }
void LocalMoe::set_hybrid_threshold(int rows) { impl_->hybrid_threshold = std::max(1, rows); }

// which 0: y1[rows of e] = xp[rows of e] @ w13[e]^T   (m = 2I, k = H)
// which 1: y2[rows of e] = act[rows of e] @ w2[e]^T   (m = H,  k = I)
// Row-major [n, K] activations are column-major [K, n]; row-major weights [M, K] are column-major [K, M], so
// C^T(col-major [M, n]) = W(op T) * X(op N): the TN layout cuBLAS runs fastest.
void LocalMoe::Impl::gemm(int which, const std::vector<int>& experts, cudaStream_t stream) {
    if (y1.size() == 0) y1.resize(static_cast<size_t>(max_tokens) * shape.top_k * 2 * shape.intermediate);
    const int H = shape.hidden, I = shape.intermediate, E = shape.num_experts;
    const int M = which == 0 ? 2 * I : H;
    const int K = which == 0 ? H : I;
    const bf16* W = which == 0 ? w13 : w2;
    const bf16* X = which == 0 ? xp.data() : act.data();
    bf16* C = which == 0 ? y1.data() : y2.data();
    const float alpha = 1.0f, beta = 0.0f;
    std::vector<int> own, grouped;  // experts with their own GEMM call / in the grouped call
    for (int e : experts)
        ((backend == GroupedGemmBackend::kCublasLoop ||
          (backend == GroupedGemmBackend::kHybrid && counts[e] >= hybrid_threshold))
             ? own
             : grouped)
            .push_back(e);
    const int groups = static_cast<int>(grouped.size());
    {
        for (int e : own) {
            CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, M, counts[e], K, &alpha,
                                      W + static_cast<size_t>(e) * M * K, CUDA_R_16BF, K,
                                      X + static_cast<size_t>(h_seg[e]) * K, CUDA_R_16BF, K, &beta,
                                      C + static_cast<size_t>(h_seg[e]) * M, CUDA_R_16BF, M, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
        }
    }
    if (groups == 0) return;
    const void** hp = h_ptrs + static_cast<size_t>(which) * 3 * E;
    for (int g = 0; g < groups; ++g) {
        const int e = grouped[g];
        hp[g] = W + static_cast<size_t>(e) * M * K;
        hp[E + g] = X + static_cast<size_t>(h_seg[e]) * K;
        hp[2 * E + g] = C + static_cast<size_t>(h_seg[e]) * M;
    }
    const void** dp = d_ptrs.data() + static_cast<size_t>(which) * 3 * E;
    CUDA_RUNTIME_CHECK(cudaMemcpyAsync(dp, hp, sizeof(void*) * 3 * E, cudaMemcpyHostToDevice, stream));
    std::vector<cublasOperation_t> ta(groups, CUBLAS_OP_T), tb(groups, CUBLAS_OP_N);
    std::vector<int> ms(groups, M), ns(groups), ks(groups, K), ld_w(groups, K), ld_c(groups, M), size(groups, 1);
    std::vector<float> alphas(groups, alpha), betas(groups, beta);
    for (int g = 0; g < groups; ++g) ns[g] = counts[grouped[g]];
    CUBLAS_CHECK(cublasGemmGroupedBatchedEx(handle, ta.data(), tb.data(), ms.data(), ns.data(), ks.data(),
                                            alphas.data(), dp, CUDA_R_16BF, ld_w.data(), dp + E, CUDA_R_16BF,
                                            ld_w.data(), betas.data(), const_cast<void* const*>(dp + 2 * E),
                                            CUDA_R_16BF, ld_c.data(), groups, size.data(), CUBLAS_COMPUTE_32F));
}

void LocalMoe::forward(const void* x, const int32_t* topk_idx, const float* topk_weights, void* out, int num_tokens,
                       void* stream) {
    impl_->forward(x, topk_idx, topk_weights, out, false, num_tokens, stream);
}

void LocalMoe::forward_f32(const void* x, const int32_t* topk_idx, const float* topk_weights, float* out,
                           int num_tokens, void* stream) {
    impl_->forward(x, topk_idx, topk_weights, out, true, num_tokens, stream);
}

void LocalMoe::Impl::forward(const void* x, const int32_t* topk_idx, const float* topk_weights, void* out,
                             bool out_f32, int num_tokens, void* stream_ptr) {
    auto& m = *this;
    GRACE_CHECK_ARG(num_tokens >= 0 && num_tokens <= m.max_tokens, "LocalMoe: num_tokens ", num_tokens,
                    " outside [0, ", m.max_tokens, "]");
    GRACE_CHECK_ARG(m.w13 && m.w2, "LocalMoe: set_weights was not called");
    GRACE_CHECK_ARG(num_tokens == 0 || (aligned16(x) && aligned16(out)),
                    "LocalMoe::forward: x and out must start on 16-byte boundaries");
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    // Captured in a CUDA graph: kernels only (the sm90 GEMMs read the segment starts on the device); the counts'
    // copy to the host and its event stay out of the graph (an event recorded in a capture cannot be waited on
    // from outside it).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (stream) CUDA_RUNTIME_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool captured = capture != cudaStreamCaptureStatusNone;
    GRACE_CHECK_ARG(!captured || m.backend == GroupedGemmBackend::kSm90,
                    "LocalMoe: only the sm90 GEMM backend can be captured in a CUDA graph (the cuBLAS backends read "
                    "the per-expert counts on the host)");
    GRACE_CHECK_ARG(!captured || !m.profiling, "LocalMoe: profiling cannot be captured in a CUDA graph");
    const int E = m.shape.num_experts, k = m.shape.top_k, H = m.shape.hidden, I = m.shape.intermediate;
    m.counts.assign(E, 0);
    m.counts_pending = false;
    m.counts_captured = captured;
    m.last_selections = static_cast<int64_t>(num_tokens) * k;
    if (num_tokens == 0) return;
    CUBLAS_CHECK(cublasSetStream(m.handle, stream));
    const int64_t n = static_cast<int64_t>(num_tokens) * k;
    const int nb = detail::sort_num_blocks(n);
    if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[0], stream));
    detail::block_rank_kernel<<<nb, detail::kSortThreads, detail::block_rank_smem(E), stream>>>(
        topk_idx, n, E, m.local_rank.data(), m.hist.data());
    CUDA_LAUNCH_CHECK();
    detail::scan_kernel<<<1, 1024, 0, stream>>>(m.hist.data(), nb, E, m.totals.data(), m.seg_start.data(), nullptr,
                                                nullptr, 1);
    CUDA_LAUNCH_CHECK();
    position_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        topk_idx, n, E, m.local_rank.data(), m.hist.data(), m.seg_start.data(), m.pos.data());
    CUDA_LAUNCH_CHECK();
    if (!captured)
        CUDA_RUNTIME_CHECK(cudaMemcpyAsync(m.h_seg, m.seg_start.data(), sizeof(int32_t) * (E + 1),
                                           cudaMemcpyDeviceToHost, stream));
    if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[1], stream));
    permute_kernel<<<static_cast<unsigned>((n + 7) / 8), 256, 0, stream>>>(
        static_cast<const uint4*>(x), m.pos.data(), n, k, H / kVec, reinterpret_cast<uint4*>(m.xp.data()));
    CUDA_LAUNCH_CHECK();
    if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[2], stream));
    const int hv = H / kVec;
    if (m.backend == GroupedGemmBackend::kSm90) {  // no host synchronization: the GEMMs read seg_start
        if (!captured) {
            CUDA_RUNTIME_CHECK(cudaEventRecord(m.counts_ready, stream));
            m.counts_pending = true;
        }
        detail::sm90_tile_starts(m.seg_start.data(), E, m.tile_start.data(), stream);
        m.sm90_up(stream);
        if (m.profiling) {
            CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[3], stream));
            CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[4], stream));  // SiLU*up is inside the up GEMM
        }
        m.sm90_down(stream);
    } else {
        CUDA_RUNTIME_CHECK(cudaStreamSynchronize(stream));  // the GEMM shapes live on the host
        std::vector<int> experts;
        for (int e = 0; e < E; ++e) {
            m.counts[e] = m.h_seg[e + 1] - m.h_seg[e];
            if (m.counts[e] > 0) experts.push_back(e);
        }
        const int64_t rows = m.h_seg[E];
        m.gemm(0, experts, stream);
        if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[3], stream));
        if (rows > 0) {
            const int64_t items = rows * (I / kVec);
            silu_mul_kernel<<<static_cast<unsigned>((items + 255) / 256), 256, 0, stream>>>(
                reinterpret_cast<const uint4*>(m.y1.data()), rows, I / kVec, reinterpret_cast<uint4*>(m.act.data()));
            CUDA_LAUNCH_CHECK();
        }
        if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[4], stream));
        m.gemm(1, experts, stream);
    }
    if (m.profiling) CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[5], stream));
    if (out_f32)
        unpermute_kernel<<<num_tokens, std::min(hv, 256), 0, stream>>>(
            reinterpret_cast<const uint4*>(m.y2.data()), m.pos.data(), topk_weights, k, hv, static_cast<float*>(out));
    else
        unpermute_kernel<<<num_tokens, std::min(hv, 256), 0, stream>>>(
            reinterpret_cast<const uint4*>(m.y2.data()), m.pos.data(), topk_weights, k, hv, static_cast<uint4*>(out));
    CUDA_LAUNCH_CHECK();
    if (m.profiling) {
        CUDA_RUNTIME_CHECK(cudaEventRecord(m.ev[6], stream));
        CUDA_RUNTIME_CHECK(cudaEventSynchronize(m.ev[6]));
        auto ms = [&](int a, int b) {
            float v = 0;
            CUDA_RUNTIME_CHECK(cudaEventElapsedTime(&v, m.ev[a], m.ev[b]));
            return v;
        };
        m.timings = {ms(0, 1), ms(1, 2), ms(2, 3), ms(3, 4), ms(4, 5), ms(5, 6), ms(0, 6)};
    }
}

void LocalMoe::rerun_experts(void* stream_ptr, bool with_activation) {
    auto& m = *impl_;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const int E = m.shape.num_experts, I = m.shape.intermediate;
    if (m.backend == GroupedGemmBackend::kSm90) {
        detail::sm90_tile_starts(m.seg_start.data(), E, m.tile_start.data(), stream);
        m.sm90_up(stream);
        m.sm90_down(stream);
        return;
    }
    m.fill_counts();  // h_seg of the last forward, whichever backend ran it
    std::vector<int> experts;
    for (int e = 0; e < E; ++e)
        if (m.counts[e] > 0) experts.push_back(e);
    if (experts.empty()) return;
    CUBLAS_CHECK(cublasSetStream(m.handle, stream));
    m.gemm(0, experts, stream);
    const int64_t rows = m.h_seg[E];
    if (with_activation && rows > 0) {
        const int64_t items = rows * (I / kVec);
        silu_mul_kernel<<<static_cast<unsigned>((items + 255) / 256), 256, 0, stream>>>(
            reinterpret_cast<const uint4*>(m.y1.data()), rows, I / kVec, reinterpret_cast<uint4*>(m.act.data()));
        CUDA_LAUNCH_CHECK();
    }
    m.gemm(1, experts, stream);
}

std::vector<uint16_t> LocalMoe::forward_host(const LocalMoeShape& shape, GroupedGemmBackend backend,
                                             const std::vector<uint16_t>& w13, const std::vector<uint16_t>& w2,
                                             const std::vector<uint16_t>& x, const std::vector<int32_t>& topk_idx,
                                             const std::vector<float>& topk_weights, int num_tokens,
                                             int hybrid_threshold) {
    const size_t E = shape.num_experts, H = shape.hidden, I = shape.intermediate, k = shape.top_k;
    const size_t T = static_cast<size_t>(num_tokens);
    GRACE_CHECK_ARG(w13.size() == E * 2 * I * H && w2.size() == E * H * I && x.size() == T * H &&
                        topk_idx.size() == T * k && topk_weights.size() == T * k,
                    "LocalMoe::forward_host: input sizes do not match the shape");
    DeviceBuffer<uint16_t> dw13, dw2, dx, dout(std::max<size_t>(1, T * H));
    DeviceBuffer<int32_t> didx;
    DeviceBuffer<float> dw;
    dw13.upload(w13);
    dw2.upload(w2);
    dx.upload(x);
    didx.upload(topk_idx);
    dw.upload(topk_weights);
    CUDA_RUNTIME_CHECK(cudaMemset(dout.data(), 0xff, dout.bytes()));  // poison: every element must be written
    LocalMoe moe(shape, std::max(1, num_tokens), backend);
    moe.set_weights(dw13.data(), dw2.data());
    moe.set_hybrid_threshold(hybrid_threshold);
    moe.forward(dx.data(), didx.data(), dw.data(), dout.data(), num_tokens, nullptr);
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    return dout.download(T * H);
}

}  // namespace grace::cuda
