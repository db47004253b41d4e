#pragma once
// Launchers of the GPU MoE layer's kernels, asynchronous on `stream` (a cudaStream_t; nullptr = the legacy default
// stream). bf16 rows are passed as void*; `hidden` is a multiple of 8.
#include <cstdint>

namespace grace::cuda::detail {

/// dst[i] = idx[i] >= 0 ? src0[idx[i]] : src1[-idx[i] - 1], rows of `hidden` bf16.
void gather_rows(const void* src0, const void* src1, const int32_t* idx, int64_t rows, int hidden, void* dst,
                 void* stream = nullptr);
/// meta = n pairs {int32 slot, float weight (bits)} -> slot[n], weight[n].
void split_meta(const int32_t* meta, int64_t n, int32_t* slot, float* weight, void* stream = nullptr);
/// meta = rows * recs pairs {slot, weight bits} -> slot [rows, k] and weight [rows, k] (recs <= k): record j of a
/// row goes to column j, columns recs..k-1 get slot -1 and weight 0.
void split_meta_padded(const int32_t* meta, int64_t rows, int recs, int k, int32_t* slot, float* weight,
                       void* stream = nullptr);
/// acc[t] += sum_{i in [ptr[t], ptr[t+1])} rows[idx[i]] (bf16 rows, fp32 acc [targets, hidden]), in list order.
void combine_reduce(const void* rows, const int32_t* ptr, const int32_t* idx, int64_t targets, int hidden, float* acc,
                    void* stream = nullptr);
/// dst[i] = int32 id of src[i] (int64 expert ids, torch's index dtype): negative -> -1 (none), >= num_experts ->
/// num_experts (refused by the caller after routing, so nothing wraps).
void narrow_ids(const int64_t* src, int64_t n, int num_experts, int32_t* dst, void* stream = nullptr);
/// dst[i] = bf16(src[i]).
void to_bf16(const float* src, int64_t n, void* dst, void* stream = nullptr);
/// One GPU's whole layer: slots[i] = slot_of[id] for the id at i (ids32 or ids64, exactly one non-null), -1 for a
/// negative id (none); an id >= num_experts gets -1 as well and lowers *first_bad to i (n < 2^31; a caller that
/// checks sets *first_bad above every index first and refuses the call when it comes back lower).
void map_slots(const int32_t* ids32, const int64_t* ids64, int64_t n, int num_experts, const int32_t* slot_of,
               int32_t* slots, int32_t* first_bad, void* stream = nullptr);

}  // namespace grace::cuda::detail
