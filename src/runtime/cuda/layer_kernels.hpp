#pragma once
// Launchers of the GPU MoE layer's kernels (legacy default stream). bf16 rows are passed as void*; `hidden` is a
// multiple of 8.
#include <cstdint>

namespace grace::cuda::detail {

/// dst[i] = idx[i] >= 0 ? src0[idx[i]] : src1[-idx[i] - 1], rows of `hidden` bf16.
void gather_rows(const void* src0, const void* src1, const int32_t* idx, int64_t rows, int hidden, void* dst);
/// meta = n pairs {int32 slot, float weight (bits)} -> slot[n], weight[n].
void split_meta(const int32_t* meta, int64_t n, int32_t* slot, float* weight);
/// acc[t] += sum_{i in [ptr[t], ptr[t+1])} rows[idx[i]] (bf16 rows, fp32 acc [targets, hidden]), in list order.
void combine_reduce(const void* rows, const int32_t* ptr, const int32_t* idx, int64_t targets, int hidden, float* acc);
/// dst[i] = bf16(src[i]).
void to_bf16(const float* src, int64_t n, void* dst);

}  // namespace grace::cuda::detail
