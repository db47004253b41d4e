// GPU replica routing (spec §5): same picks as the CPU router, computed from the flat sequence table.
#include <algorithm>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "grace/cuda_moe.hpp"
#include "sort_kernels.cuh"

namespace grace::cuda {

bool device_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return n > 0;
}

namespace {

// One thread per token: instance and GPU of each selection, the dispatch layout, per-instance counts.
__global__ void route_kernel(const int32_t* __restrict__ topk_idx, int num_tokens, int top_k, int num_experts,
                             int num_ranks, int period, const int32_t* __restrict__ sequence /*[E][Q] of source*/,
                             const int32_t* __restrict__ instance_ptr, const int32_t* __restrict__ instance_gpu,
                             const int32_t* __restrict__ local_rank, const int32_t* __restrict__ block_prefix,
                             const int32_t* __restrict__ base, int32_t* __restrict__ topk_instance,
                             int32_t* __restrict__ topk_rank, int32_t* __restrict__ num_tokens_per_rank,
                             bool* __restrict__ is_token_in_rank, int32_t* __restrict__ num_tokens_per_instance) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= num_tokens) return;
    bool* in_rank = is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
    for (int g = 0; g < num_ranks; ++g) in_rank[g] = false;
    for (int j = 0; j < top_k; ++j) {
        const int64_t p = static_cast<int64_t>(t) * top_k + j;
        const int e = topk_idx[p];
        if (e < 0 || e >= num_experts) {
            topk_instance[p] = -1;
            topk_rank[p] = -1;
            continue;
        }
        const int64_t rank = static_cast<int64_t>(block_prefix[(p / detail::kSortItems) * num_experts + e]) + local_rank[p];
        const int pos = static_cast<int>((base[e] + rank) % period);
        const int inst = sequence[static_cast<int64_t>(e) * period + pos];
        const int g = instance_gpu[instance_ptr[e] + inst];
        topk_instance[p] = inst;
        topk_rank[p] = g;
        atomicAdd(&num_tokens_per_instance[instance_ptr[e] + inst], 1);
        if (!in_rank[g]) {
            in_rank[g] = true;
            atomicAdd(&num_tokens_per_rank[g], 1);
        }
    }
}

// Online adaptation: the per-call instance counts added to the interval's totals, on the router's stream.
__global__ void accumulate_counts_kernel(const int32_t* __restrict__ per_call, int n, long long* __restrict__ total) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) total[i] += per_call[i];
}

}  // namespace

struct GpuReplicaRouter::Impl {
    RouteTable table;
    DeviceBuffer<int32_t> sequence, instance_ptr, instance_gpu, offsets, base, totals;
    DeviceBuffer<int32_t> local_rank, hist;
    bool accumulate = false;
    DeviceBuffer<long long> count_totals;  // [instances], with accumulate
};

GpuReplicaRouter::GpuReplicaRouter(const RouteTable& table) : impl_(std::make_unique<Impl>()) {
    table.validate();
    GRACE_CHECK_ARG(table.num_experts <= detail::kMaxKeys, "GPU router: ", table.num_experts, " experts > ",
                    detail::kMaxKeys);
    auto& m = *impl_;
    m.table = table;
    m.sequence.upload(table.sequence);
    m.instance_ptr.upload(table.instance_ptr);
    m.instance_gpu.upload(table.instance_gpu);
    m.offsets.resize(static_cast<size_t>(table.num_sources) * table.num_experts);
    m.base.resize(table.num_experts);
    m.totals.resize(table.num_experts);
    reset();
}

GpuReplicaRouter::~GpuReplicaRouter() = default;

int GpuReplicaRouter::num_ranks() const { return impl_->table.num_sources; }
int GpuReplicaRouter::num_instances() const { return static_cast<int>(impl_->table.instance_gpu.size()); }

void GpuReplicaRouter::reset() {
    CUDA_RUNTIME_CHECK(cudaMemset(impl_->offsets.data(), 0, impl_->offsets.bytes()));
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
}

std::vector<int32_t> GpuReplicaRouter::offsets() const {
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    return impl_->offsets.download();
}

void GpuReplicaRouter::route(int source, const int32_t* topk_idx, int num_tokens, int top_k, const RouteOutputs& out,
                             void* stream_ptr) {
    auto& m = *impl_;
    const auto& t = m.table;
    GRACE_CHECK_ARG(source >= 0 && source < t.num_sources, "GPU router: source ", source, " outside [0, ",
                    t.num_sources, ")");
    GRACE_CHECK_ARG(num_tokens >= 0 && top_k >= 1, "GPU router: num_tokens ", num_tokens, ", top_k ", top_k);
    GRACE_CHECK_ARG(out.topk_instance && out.topk_rank && out.num_tokens_per_rank && out.is_token_in_rank &&
                        out.num_tokens_per_instance,
                    "GPU router: every RouteOutputs pointer is required");
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const int E = t.num_experts;
    CUDA_RUNTIME_CHECK(cudaMemsetAsync(out.num_tokens_per_rank, 0, sizeof(int32_t) * t.num_sources, stream));
    CUDA_RUNTIME_CHECK(cudaMemsetAsync(out.num_tokens_per_instance, 0, sizeof(int32_t) * t.instance_gpu.size(), stream));
    if (num_tokens == 0) return;
    const int64_t n = static_cast<int64_t>(num_tokens) * top_k;
    const int nb = detail::sort_num_blocks(n);
    m.local_rank.reserve(n);
    m.hist.reserve(static_cast<size_t>(nb) * E);
    detail::block_rank_kernel<<<nb, detail::kSortThreads, detail::block_rank_smem(E), stream>>>(
        topk_idx, n, E, m.local_rank.data(), m.hist.data());
    CUDA_LAUNCH_CHECK();
    detail::scan_kernel<<<1, 1024, 0, stream>>>(m.hist.data(), nb, E, m.totals.data(), nullptr,
                                                m.offsets.data() + static_cast<size_t>(source) * E, m.base.data(),
                                                t.period);
    CUDA_LAUNCH_CHECK();
    route_kernel<<<(num_tokens + 127) / 128, 128, 0, stream>>>(
        topk_idx, num_tokens, top_k, E, t.num_sources, t.period,
        m.sequence.data() + static_cast<size_t>(source) * E * t.period, m.instance_ptr.data(), m.instance_gpu.data(),
        m.local_rank.data(), m.hist.data(), m.base.data(), out.topk_instance, out.topk_rank, out.num_tokens_per_rank,
        out.is_token_in_rank, out.num_tokens_per_instance);
    CUDA_LAUNCH_CHECK();
    if (m.accumulate) {
        const int ni = static_cast<int>(t.instance_gpu.size());
        accumulate_counts_kernel<<<(ni + 127) / 128, 128, 0, stream>>>(out.num_tokens_per_instance, ni,
                                                                       m.count_totals.data());
        CUDA_LAUNCH_CHECK();
    }
}

void GpuReplicaRouter::set_sequences(const std::vector<int32_t>& sequence, void* stream_ptr) {
    auto& m = *impl_;
    RouteTable next = m.table;
    next.sequence = sequence;
    next.validate();
    m.table.sequence = sequence;
    // Pageable source: cudaMemcpyAsync returns once the bytes are staged, so `sequence` may go away after it.
    CUDA_RUNTIME_CHECK(cudaMemcpyAsync(m.sequence.data(), sequence.data(), sequence.size() * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream_ptr)));
}

void GpuReplicaRouter::set_count_accumulation(bool on) {
    auto& m = *impl_;
    if (on && !m.accumulate) {
        m.count_totals.resize(std::max<size_t>(1, m.table.instance_gpu.size()));
        CUDA_RUNTIME_CHECK(cudaMemset(m.count_totals.data(), 0, m.count_totals.bytes()));
    }
    m.accumulate = on;
}

std::vector<int64_t> GpuReplicaRouter::take_counts() {
    auto& m = *impl_;
    const size_t ni = m.table.instance_gpu.size();
    if (!m.accumulate) return std::vector<int64_t>(ni, 0);
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    const std::vector<long long> c = m.count_totals.download(ni);
    CUDA_RUNTIME_CHECK(cudaMemset(m.count_totals.data(), 0, m.count_totals.bytes()));
    return std::vector<int64_t>(c.begin(), c.end());
}

RouteResult GpuReplicaRouter::route_host(int source, const std::vector<int32_t>& topk_idx, int num_tokens, int top_k) {
    GRACE_CHECK_ARG(topk_idx.size() == static_cast<size_t>(num_tokens) * top_k, "route_host: topk_idx has ",
                    topk_idx.size(), " entries, expected ", num_tokens, "*", top_k);
    const int G = num_ranks();
    DeviceBuffer<int32_t> idx, inst, rank, per_rank(G), per_inst(num_instances());
    DeviceBuffer<bool> in_rank(std::max<size_t>(1, static_cast<size_t>(num_tokens) * G));
    idx.upload(topk_idx);
    inst.resize(std::max<size_t>(1, topk_idx.size()));
    rank.resize(std::max<size_t>(1, topk_idx.size()));
    route(source, idx.data(), num_tokens, top_k,
          RouteOutputs{inst.data(), rank.data(), per_rank.data(), in_rank.data(), per_inst.data()}, nullptr);
    CUDA_RUNTIME_CHECK(cudaDeviceSynchronize());
    RouteResult r;
    r.topk_instance = inst.download(topk_idx.size());
    r.topk_rank = rank.download(topk_idx.size());
    r.num_tokens_per_rank = per_rank.download();
    r.num_tokens_per_instance = per_inst.download();
    const auto b = in_rank.download(static_cast<size_t>(num_tokens) * G);
    r.is_token_in_rank.assign(b.begin(), b.end());
    return r;
}

}  // namespace grace::cuda
