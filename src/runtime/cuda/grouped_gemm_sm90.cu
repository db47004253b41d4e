// Grouped GEMM for the expert layer on Hopper (sm_90a): one launch over all experts, the expert row offsets are
// read on the device (no host synchronization), TMA loads into a 3- or 4-stage shared-memory ring, warp-specialized
// (one producer thread issues the loads, two consumer warpgroups run wgmma), persistent, fp32 accumulation, bf16
// out.
//
// Why our own kernel: cublasGemmGroupedBatchedEx needs the per-expert row counts on the host (a sync per layer)
// and runs one tile configuration for every group; the per-expert cublasGemmEx loop costs ~10 us of host time per
// call. Both left the expert GEMMs at 31-57% of a dense GEMM of the same FLOPs (bench/results/gpu.md).
#include "grouped_gemm_sm90.hpp"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <mutex>

#include "cuda_check.hpp"
#include "grace/error.hpp"

namespace grace::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kBlockM = 128;  // rows per tile: two consumer warpgroups x 64
constexpr int kBlockN = 256;  // output columns per tile (fused: 128 gate + 128 up columns)
constexpr int kBlockK = 64;   // 64 bf16 = 128 bytes: one 128-byte swizzle atom per row
constexpr int kThreads = 384;  // warpgroup 0: producer; 1, 2: consumers
constexpr int kStageBytes = (kBlockM + kBlockN) * kBlockK * 2;
// The staged epilogue writes the tile into shared memory (rows padded by 16 bytes: conflict-free for the
// accumulator layout) and copies each valid row out with an asynchronous bulk copy, so the consumers go on to
// the next tile at once; it costs a pipeline stage (3 instead of 4 fit next to the 66 KB staging area).
constexpr int kStagingStride = kBlockN * 2 + 16;  // bytes per staged row
constexpr int stages(bool staged) { return staged ? 3 : 4; }
constexpr int smem_bytes(bool staged) {
    return stages(staged) * kStageBytes + (staged ? kBlockM * kStagingStride : 0) + 2 * stages(staged) * 8 + 1024;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GRACE_SM90_DEVICE 1
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
// 2-D TMA load of box (c0 = column, c1 = row) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}
// Shared-memory matrix descriptor for a K-major tile of 128-byte rows with the 128-byte swizzle (the layout the
// TMA writes): stride between 8-row groups 1024 bytes; the leading offset is unused with this swizzle.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
    const uint64_t a = smem_addr(p);
    return ((a & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from touching the accumulators while a wgmma may still write them.
__device__ __forceinline__ void fence_acc(float (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// d[64 x 256] += A[64 x 16] * B[256 x 16]^T, both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},"
        " %128, %129, p, 1, 1, 0, 0;\n}\n"
        :
          "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1));
}
#endif

// tile_start[e] = sum over e' < e of ceil(rows(e') / kBlockM); tile_start[E] = the total. One warp.
__global__ void tile_start_kernel(const int32_t* __restrict__ seg_start, int num_experts,
                                  int32_t* __restrict__ tile_start) {
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < num_experts; base += 32) {
        const int e = base + lane;
        const int v = e < num_experts ? (seg_start[e + 1] - seg_start[e] + kBlockM - 1) / kBlockM : 0;
        int incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += n;
        }
        if (e < num_experts) tile_start[e] = carry + incl - v;
        carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) tile_start[num_experts] = carry;
}

// Persistent: block b takes tiles b, b + gridDim.x, ... of the (row tile of one expert) x (column tile) list, so
// the producer loads the next tile while the consumers store the last one. Any grid size works (a grid of one
// block per tile is the non-persistent variant; blocks without a tile return at once).
//   kFusedSwiGlu: B rows of expert e are [e * b_rows_per_expert, +2I): gate rows [0, I), up rows [I, 2I); a
//     column tile loads 128 gate and the matching 128 up rows, and the epilogue writes silu(gate) * up into
//     out [rows, n_out = I].
//   otherwise: out [rows, n_out] = A @ B_e^T with B_e = rows [e * b_rows_per_expert, + n_out).
template <bool kFusedSwiGlu, bool kStaged>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                        const int32_t* __restrict__ seg_start, const int32_t* __restrict__ tile_start,
                        int num_experts, int b_rows_per_expert, int n_out, int k_dim, int n_tiles,
                        bf16* __restrict__ out) {
#if defined(GRACE_SM90_DEVICE)
    constexpr int kStages = stages(kStaged);
    const int total_tiles = tile_start[num_experts] * n_tiles;
    if (static_cast<int>(blockIdx.x) >= total_tiles) return;
    const int k_tiles = (k_dim + kBlockK - 1) / kBlockK;
    // Tile -> expert, first row, rows, column tile. Column tiles are innermost: neighbouring blocks share rows.
    struct Tile { int e, row_begin, rows, n_tile; };
    auto locate = [&](int tile) {
        const int m_global = tile / n_tiles;
        int lo = 0, hi = num_experts - 1;  // the last expert whose first row tile is <= m_global (it has one)
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (tile_start[mid] <= m_global) lo = mid; else hi = mid - 1;
        }
        const int row_begin = seg_start[lo] + (m_global - tile_start[lo]) * kBlockM;
        return Tile{lo, row_begin, min(kBlockM, seg_start[lo + 1] - row_begin), tile % n_tiles};
    };

    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
    uint8_t* s_a = smem;                                     // [kStages][kBlockM][kBlockK]
    uint8_t* s_b = smem + kStages * kBlockM * kBlockK * 2;  // [kStages][kBlockN][kBlockK]
    uint8_t* staging = smem + kStages * kStageBytes;  // [kBlockM][kStagingStride] when kStaged
    uint64_t* full = reinterpret_cast<uint64_t*>(staging + (kStaged ? kBlockM * kStagingStride : 0));
    uint64_t* empty = full + kStages;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], 2);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();

    // Stage s serves the k-iterations it = s, s + kStages, ... counted over all of this block's tiles; the n-th
    // use of a stage waits for phase n of its barriers.
    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        if (threadIdx.x == 0) {
            int it = 0;
            for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
                const Tile tl = locate(tile);
                const int b_row = tl.e * b_rows_per_expert + tl.n_tile * (kFusedSwiGlu ? kBlockN / 2 : kBlockN);
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const int s = it % kStages;
                    if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) - 1) & 1);
                    mbar_expect_tx(&full[s], kStageBytes);
                    const int k0 = kt * kBlockK;
                    tma_load(s_a + s * kBlockM * kBlockK * 2, &map_a, k0, tl.row_begin, &full[s]);
                    uint8_t* b = s_b + s * kBlockN * kBlockK * 2;
                    if constexpr (kFusedSwiGlu) {
                        tma_load(b, &map_b, k0, b_row, &full[s]);
                        tma_load(b + (kBlockN / 2) * kBlockK * 2, &map_b, k0, b_row + n_out, &full[s]);
                    } else {
                        tma_load(b, &map_b, k0, b_row, &full[s]);
                    }
                }
            }
        }
        return;
    }

    const int c = wg - 1;  // consumer: rows [64c, 64c + 64) of each tile
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    float d[128];
    int it = 0;
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const Tile tl = locate(tile);
#pragma unroll
        for (int i = 0; i < 128; ++i) d[i] = 0.f;
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int s = it % kStages;
            mbar_wait(&full[s], (it / kStages) & 1);
            const uint8_t* a = s_a + s * kBlockM * kBlockK * 2 + c * 64 * kBlockK * 2;
            const uint8_t* b = s_b + s * kBlockN * kBlockK * 2;
            fence_acc(d);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockK / 16; ++kk)
                wgmma_m64n256k16(d, smem_desc(a + kk * 32), smem_desc(b + kk * 32));
            wgmma_commit();
            fence_acc(d);
            wgmma_wait<1>();  // the previous stage's wgmmas are done: hand its buffers back to the producer
            if (kt > 0 && threadIdx.x % 128 == 0) mbar_arrive(&empty[(it - 1) % kStages]);
        }
        wgmma_wait<0>();
        fence_acc(d);
        if (threadIdx.x % 128 == 0) mbar_arrive(&empty[(it - 1) % kStages]);
        const int row_begin = tl.row_begin, rows = tl.rows, n_tile = tl.n_tile;

        // Accumulator layout of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 (+8); d[4j + 2h + q] is
        // row + 8h, column 8j + 2(lane % 4) + q.
        const int r0 = c * 64 + warp * 16 + lane / 4;
        if constexpr (kStaged) {
            // Wait until this thread's bulk copies of the previous tile have read the staging rows, then let
            // the warpgroup overwrite them.
            if (threadIdx.x % 128 < 64) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                uint8_t* srow = staging + (r0 + 8 * h) * kStagingStride + 4 * (lane % 4);
                if constexpr (kFusedSwiGlu) {
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        const float g0 = d[4 * j + 2 * h], g1 = d[4 * j + 2 * h + 1];
                        const float u0 = d[4 * (j + 16) + 2 * h], u1 = d[4 * (j + 16) + 2 * h + 1];
                        *reinterpret_cast<__nv_bfloat162*>(srow + 16 * j) =
                            __floats2bfloat162_rn(g0 / (1.f + __expf(-g0)) * u0, g1 / (1.f + __expf(-g1)) * u1);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 32; ++j)
                        *reinterpret_cast<__nv_bfloat162*>(srow + 16 * j) =
                            __floats2bfloat162_rn(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                }
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // st.shared -> visible to the bulk copy
            asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
            const int q = threadIdx.x % 128;  // threads 0..63 of the warpgroup copy its rows out, one each
            if (q < 64 && c * 64 + q < rows) {
                const int r = c * 64 + q;
                const int col0 = n_tile * (kFusedSwiGlu ? kBlockN / 2 : kBlockN);
                const int cols = min(kFusedSwiGlu ? kBlockN / 2 : kBlockN, n_out - col0);
                bf16* dst = out + static_cast<int64_t>(row_begin + r) * n_out + col0;
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
                             "r"(smem_addr(staging + r * kStagingStride)), "r"(cols * 2)
                             : "memory");
            }
            if (q < 64) asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        } else {  // direct stores from the accumulators
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + 8 * h;
                if (r >= rows) continue;
                bf16* dst = out + static_cast<int64_t>(row_begin + r) * n_out;
                if constexpr (kFusedSwiGlu) {
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        const int col = n_tile * (kBlockN / 2) + 8 * j + 2 * (lane % 4);
                        const float g0 = d[4 * j + 2 * h], g1 = d[4 * j + 2 * h + 1];
                        const float u0 = d[4 * (j + 16) + 2 * h], u1 = d[4 * (j + 16) + 2 * h + 1];
                        *reinterpret_cast<__nv_bfloat162*>(dst + col) =
                            __floats2bfloat162_rn(g0 / (1.f + __expf(-g0)) * u0, g1 / (1.f + __expf(-g1)) * u1);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 32; ++j) {
                        const int col = n_tile * kBlockN + 8 * j + 2 * (lane % 4);
                        if (col < n_out)
                            *reinterpret_cast<__nv_bfloat162*>(dst + col) = __floats2bfloat162_rn(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                    }
                }
            }
        }
    }
    if constexpr (kStaged) {
        if (threadIdx.x % 128 < 64) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    });
    return fn;
}

// Row-major bf16 [rows, cols] in global memory, loaded in boxes of [box_rows, 64] with the 128-byte swizzle.
CUtensorMap make_map(const void* base, int64_t rows, int64_t cols, int box_rows) {
    CUtensorMap map;
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
    const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(box_rows)};
    const cuuint32_t elem_strides[2] = {1, 1};
    const CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides,
                                   box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    GRACE_CHECK(r == CUDA_SUCCESS, ErrorCode::kBackend, "cuTensorMapEncodeTiled failed (", static_cast<int>(r),
                ") for a [", rows, ", ", cols, "] bf16 operand");
    return map;
}

bool g_persistent = true;
Sm90Epilogue g_epilogue = Sm90Epilogue::kAuto;

template <bool kFused, bool kStaged>
void launch_kernel(const CUtensorMap& a, const CUtensorMap& b, const int32_t* seg_start, const int32_t* tile_start, int E,
            int b_rows, int n_out, int k_dim, int n_tiles, int64_t max_rows, bf16* out, cudaStream_t stream) {
    CUDA_RUNTIME_CHECK(
        cudaFuncSetAttribute(grouped_gemm_kernel<kFused, kStaged>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem_bytes(kStaged)));
    // Upper bound on the tiles (every expert's last row tile may be partial); the exact count is on the device.
    int64_t blocks = ((max_rows + kBlockM - 1) / kBlockM + E) * n_tiles;
    if (g_persistent) {
        int device = 0, sms = 0;
        CUDA_RUNTIME_CHECK(cudaGetDevice(&device));
        CUDA_RUNTIME_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        blocks = std::min<int64_t>(blocks, sms);
    }
    grouped_gemm_kernel<kFused, kStaged><<<static_cast<unsigned>(blocks), kThreads, smem_bytes(kStaged), stream>>>(
        a, b, seg_start, tile_start, E, b_rows, n_out, k_dim, n_tiles, out);
    CUDA_LAUNCH_CHECK();
}

template <bool kFused>
void launch(const CUtensorMap& a, const CUtensorMap& b, const int32_t* seg_start, const int32_t* tile_start, int E,
            int b_rows, int n_out, int k_dim, int n_tiles, int64_t max_rows, bf16* out, cudaStream_t stream) {
    // kAuto: staged for the down GEMM (its 128x256 output tile per 12-16 k-steps made the direct stores cost ~10%
    // of its time), direct for the fused gate+up GEMM (half the output per twice the k-steps; it keeps the 4th
    // pipeline stage). Measured side by side in bm_moe_gpu (bench/results/gpu.md).
    const bool staged = g_epilogue == Sm90Epilogue::kStaged || (g_epilogue == Sm90Epilogue::kAuto && !kFused);
    (staged ? launch_kernel<kFused, true> : launch_kernel<kFused, false>)(a, b, seg_start, tile_start, E, b_rows,
                                                                            n_out, k_dim, n_tiles, max_rows, out,
                                                                            stream);
}

}  // namespace

bool sm90_grouped_gemm_available(int device) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        return false;
    return major == 9 && minor == 0 && encode_fn() != nullptr;  // sm_90a code runs on compute capability 9.0 only
}

void sm90_set_persistent(bool on) { g_persistent = on; }
void sm90_set_epilogue(Sm90Epilogue mode) { g_epilogue = mode; }

bool sm90_grouped_gemm_fits(int hidden, int intermediate) {
    return hidden % 8 == 0 && intermediate % (kBlockN / 2) == 0;
}

void sm90_tile_starts(const int32_t* seg_start, int num_experts, int32_t* tile_start, cudaStream_t stream) {
    tile_start_kernel<<<1, 32, 0, stream>>>(seg_start, num_experts, tile_start);
    CUDA_LAUNCH_CHECK();
}

void sm90_gemm_up_swiglu(const bf16* xp, const bf16* w13, bf16* act, const int32_t* seg_start,
                         const int32_t* tile_start, int num_experts, int hidden, int intermediate,
                         int64_t rows_capacity, int64_t max_rows, cudaStream_t stream) {
    GRACE_CHECK(sm90_grouped_gemm_fits(hidden, intermediate), ErrorCode::kUnsupported,
                "sm90 grouped GEMM: intermediate ", intermediate, " is not a multiple of ", kBlockN / 2);
    if (max_rows <= 0) return;
    const int E = num_experts, H = hidden, I = intermediate;
    const CUtensorMap map_x = make_map(xp, rows_capacity, H, kBlockM);
    const CUtensorMap map_w13 = make_map(w13, static_cast<int64_t>(E) * 2 * I, H, kBlockN / 2);
    launch<true>(map_x, map_w13, seg_start, tile_start, E, 2 * I, I, H, I / (kBlockN / 2), max_rows, act, stream);
}

void sm90_gemm_down(const bf16* act, const bf16* w2, bf16* y2, const int32_t* seg_start, const int32_t* tile_start,
                    int num_experts, int hidden, int intermediate, int64_t rows_capacity, int64_t max_rows,
                    cudaStream_t stream) {
    GRACE_CHECK(sm90_grouped_gemm_fits(hidden, intermediate), ErrorCode::kUnsupported,
                "sm90 grouped GEMM: hidden ", hidden, " is not a multiple of 8");
    if (max_rows <= 0) return;
    const int E = num_experts, H = hidden, I = intermediate;
    const CUtensorMap map_act = make_map(act, rows_capacity, I, kBlockM);
    const CUtensorMap map_w2 = make_map(w2, static_cast<int64_t>(E) * H, I, kBlockN);
    launch<false>(map_act, map_w2, seg_start, tile_start, E, H, H, I, (H + kBlockN - 1) / kBlockN, max_rows, y2,
                  stream);
}

}  // namespace grace::cuda::detail
