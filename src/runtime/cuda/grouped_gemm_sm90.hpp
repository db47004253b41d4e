#pragma once
// The expert GEMMs of LocalMoe as two launches of our own Hopper grouped GEMM (grouped_gemm_sm90.cu). Internal
// to the CUDA backend.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace grace::cuda::detail {

/// True when `device` can run the kernel: compute capability exactly 9.0 (the code is built for sm_90a) and the
/// driver exports cuTensorMapEncodeTiled.
bool sm90_grouped_gemm_available(int device);
/// True when the shape suits the kernel: hidden % 8 == 0 (16-byte TMA strides) and intermediate % 128 == 0 (a
/// fused column tile holds 128 gate and the matching 128 up columns of one expert).
bool sm90_grouped_gemm_fits(int hidden, int intermediate);

// Shapes (row-major bf16, device memory): xp [rows_capacity, H], w13 [E, 2I, H] (gate rows [0, I), up rows
// [I, 2I)), act [rows_capacity, I], w2 [E, H, I], y2 [rows_capacity, H]. Expert e owns rows
// [seg_start[e], seg_start[e + 1]) (device int32 [E + 1], non-decreasing, seg_start[E] <= max_rows <=
// rows_capacity). max_rows is a host-side upper bound on seg_start[E]: it sizes the grid, so no host
// synchronization is needed. All calls are asynchronous on `stream`; CUDA errors throw kBackend, a shape that
// does not fit throws kUnsupported.

/// Persistent launch (default; one block per SM walks the tiles) or one block per tile (for side-by-side timing).
/// Process-wide; not thread-safe.
void sm90_set_persistent(bool on);
/// How a tile leaves the kernel: kStaged writes it to shared memory and copies each valid row out with an
/// asynchronous bulk copy (3 pipeline stages fit beside the staging area); kDirect stores from the accumulators
/// (4 stages); kAuto (default) stages the down GEMM only. Process-wide; not thread-safe.
enum class Sm90Epilogue { kAuto, kDirect, kStaged };
void sm90_set_epilogue(Sm90Epilogue mode);

/// tile_start [E + 1] (device) = exclusive prefix of ceil(rows(e) / 128): the row tiles the GEMMs walk.
void sm90_tile_starts(const int32_t* seg_start, int num_experts, int32_t* tile_start, cudaStream_t stream);
/// act[r] = silu(xp[r] @ w13[e, :I]^T) * (xp[r] @ w13[e, I:]^T) for every row r of every expert e (fp32 math).
void sm90_gemm_up_swiglu(const __nv_bfloat16* xp, const __nv_bfloat16* w13, __nv_bfloat16* act,
                         const int32_t* seg_start, const int32_t* tile_start, int num_experts, int hidden,
                         int intermediate, int64_t rows_capacity, int64_t max_rows, cudaStream_t stream);
/// y2[r] = act[r] @ w2[e]^T for every row r of every expert e.
void sm90_gemm_down(const __nv_bfloat16* act, const __nv_bfloat16* w2, __nv_bfloat16* y2, const int32_t* seg_start,
                    const int32_t* tile_start, int num_experts, int hidden, int intermediate, int64_t rows_capacity,
                    int64_t max_rows, cudaStream_t stream);

}  // namespace grace::cuda::detail
