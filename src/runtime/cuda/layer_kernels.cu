// Device kernels of the GPU MoE layer (gpu_moe_layer.cpp holds the host logic).
#include <cuda_bf16.h>

#include "cuda_check.hpp"
#include "layer_kernels.hpp"

namespace grace::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;
unsigned blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

// One warp per output row: dst[i] = idx[i] >= 0 ? src0[idx[i]] : src1[-idx[i] - 1] (16-byte accesses).
__global__ void gather_rows_kernel(const uint4* __restrict__ src0, const uint4* __restrict__ src1,
                                   const int32_t* __restrict__ idx, int64_t rows, int hv, uint4* __restrict__ dst) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (i >= rows) return;
    const int32_t s = idx[i];
    const uint4* src = s >= 0 ? src0 + static_cast<int64_t>(s) * hv : src1 + static_cast<int64_t>(-s - 1) * hv;
    uint4* d = dst + i * hv;
    for (int c = threadIdx.x & 31; c < hv; c += 32) d[c] = src[c];
}

// Received metadata rows of `recs` {int32 slot, float weight} pairs -> slot [rows, recs] and weight [rows, recs].
__global__ void split_meta_kernel(const int32_t* __restrict__ meta, int64_t n, int32_t* __restrict__ slot,
                                  float* __restrict__ weight) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    slot[i] = meta[2 * i];
    weight[i] = __int_as_float(meta[2 * i + 1]);
}

// acc[t] += sum over i in [ptr[t], ptr[t+1]) of rows[idx[i]] (bf16 -> fp32, in list order); one block per target.
__global__ void combine_reduce_kernel(const uint4* __restrict__ rows, const int32_t* __restrict__ ptr,
                                      const int32_t* __restrict__ idx, int hv, float* __restrict__ acc) {
    const int64_t t = blockIdx.x;
    const int b = ptr[t], e = ptr[t + 1];
    if (b == e) return;
    for (int c = threadIdx.x; c < hv; c += blockDim.x) {
        float4* a = reinterpret_cast<float4*>(acc + (t * hv + c) * 8);
        float4 lo = a[0], hi = a[1];
        for (int i = b; i < e; ++i) {
            const uint4 v4 = __ldg(rows + static_cast<int64_t>(idx[i]) * hv + c);
            const bf16* v = reinterpret_cast<const bf16*>(&v4);
            lo.x += __bfloat162float(v[0]), lo.y += __bfloat162float(v[1]);
            lo.z += __bfloat162float(v[2]), lo.w += __bfloat162float(v[3]);
            hi.x += __bfloat162float(v[4]), hi.y += __bfloat162float(v[5]);
            hi.z += __bfloat162float(v[6]), hi.w += __bfloat162float(v[7]);
        }
        a[0] = lo, a[1] = hi;
    }
}

// Pads `recs` records per row to k columns (slot -1, weight 0 beyond recs).
__global__ void split_meta_padded_kernel(const int32_t* __restrict__ meta, int64_t rows, int recs, int k,
                                         int32_t* __restrict__ slot, float* __restrict__ weight) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= rows * k) return;
    const int64_t r = i / k;
    const int j = static_cast<int>(i % k);
    if (j < recs) {
        const int64_t m = r * recs + j;
        slot[i] = meta[2 * m];
        weight[i] = __int_as_float(meta[2 * m + 1]);
    } else {
        slot[i] = -1;
        weight[i] = 0.0f;
    }
}

__global__ void narrow_ids_kernel(const int64_t* __restrict__ src, int64_t n, int num_experts,
                                  int32_t* __restrict__ dst) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t v = src[i];
    dst[i] = v < 0 ? -1 : (v >= num_experts ? num_experts : static_cast<int32_t>(v));
}

__global__ void to_bf16_kernel(const float* __restrict__ src, int64_t n, bf16* __restrict__ dst) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}

__global__ void map_slots_kernel(const int32_t* __restrict__ ids32, const int64_t* __restrict__ ids64, int64_t n,
                                 int num_experts, const int32_t* __restrict__ slot_of, int32_t* __restrict__ slots,
                                 int32_t* __restrict__ first_bad) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t v = ids32 ? static_cast<int64_t>(ids32[i]) : ids64[i];
    int32_t s = -1;
    if (v >= num_experts)
        atomicMin(first_bad, static_cast<int32_t>(i));
    else if (v >= 0)
        s = slot_of[v];
    slots[i] = s;
}

}  // namespace

void gather_rows(const void* src0, const void* src1, const int32_t* idx, int64_t rows, int hidden, void* dst,
                 void* stream) {
    if (rows == 0) return;
    gather_rows_kernel<<<blocks(rows, 8), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const uint4*>(src0), static_cast<const uint4*>(src1), idx, rows, hidden / 8,
        static_cast<uint4*>(dst));
    CUDA_LAUNCH_CHECK();
}

void split_meta(const int32_t* meta, int64_t n, int32_t* slot, float* weight, void* stream) {
    if (n == 0) return;
    split_meta_kernel<<<blocks(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(meta, n, slot, weight);
    CUDA_LAUNCH_CHECK();
}

void split_meta_padded(const int32_t* meta, int64_t rows, int recs, int k, int32_t* slot, float* weight,
                       void* stream) {
    if (rows == 0) return;
    split_meta_padded_kernel<<<blocks(rows * k, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(meta, rows, recs,
                                                                                                   k, slot, weight);
    CUDA_LAUNCH_CHECK();
}

void combine_reduce(const void* rows, const int32_t* ptr, const int32_t* idx, int64_t targets, int hidden, float* acc,
                    void* stream) {
    if (targets == 0) return;
    const int hv = hidden / 8;
    combine_reduce_kernel<<<static_cast<unsigned>(targets), hv < 256 ? hv : 256, 0,
                            static_cast<cudaStream_t>(stream)>>>(static_cast<const uint4*>(rows), ptr,
                                                                                   idx, hv, acc);
    CUDA_LAUNCH_CHECK();
}

void narrow_ids(const int64_t* src, int64_t n, int num_experts, int32_t* dst, void* stream) {
    if (n == 0) return;
    narrow_ids_kernel<<<blocks(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, n, num_experts, dst);
    CUDA_LAUNCH_CHECK();
}

void map_slots(const int32_t* ids32, const int64_t* ids64, int64_t n, int num_experts, const int32_t* slot_of,
               int32_t* slots, int32_t* first_bad, void* stream) {
    if (n == 0) return;
    map_slots_kernel<<<blocks(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(ids32, ids64, n, num_experts,
                                                                                   slot_of, slots, first_bad);
    CUDA_LAUNCH_CHECK();
}

void to_bf16(const float* src, int64_t n, void* dst, void* stream) {
    if (n == 0) return;
    to_bf16_kernel<<<blocks(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, n, static_cast<bf16*>(dst));
    CUDA_LAUNCH_CHECK();
}

}  // namespace grace::cuda::detail
