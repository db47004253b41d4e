#pragma once
// Stable counting sort of the flat selections p = t*k + j by key (expert id), in three launches:
//   1. block_rank_kernel: each block takes kSortItems consecutive selections and gives each its rank among the
//      block's earlier selections with the same key (warp match_any + per-warp histograms), and the block's
//      histogram [num_blocks][num_keys].
//   2. scan_kernel (one block): exclusive scan of the histograms over blocks per key (in place) and the key
//      totals; an optional exclusive scan over keys gives segment starts.
//   3. the consumer adds: rank of p among all same-key selections = hist[block(p)][key] + local_rank[p].
// The order is token order then j order, which is what spec §5 needs for the WRR positions.
#include <cstdint>

namespace grace::cuda::detail {

constexpr int kSortThreads = 256;
constexpr int kSortRounds = 8;
constexpr int kSortItems = kSortThreads * kSortRounds;  // selections per block
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kMaxKeys = 1024;  // experts per layer the sort supports

inline int sort_num_blocks(int64_t n) { return static_cast<int>((n + kSortItems - 1) / kSortItems); }

// keys: [n], values < 0 or >= num_keys are ignored (local_rank -1). hist: [num_blocks][num_keys].
static __global__ void __launch_bounds__(kSortThreads) block_rank_kernel(const int32_t* __restrict__ keys, int64_t n,
                                                                  int num_keys, int32_t* __restrict__ local_rank,
                                                                  int32_t* __restrict__ hist) {
    extern __shared__ int32_t smem[];
    int32_t* s_running = smem;             // [num_keys]
    int32_t* s_warp = smem + num_keys;     // [kSortWarps][num_keys]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < num_keys; i += kSortThreads) s_running[i] = 0;
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kSortItems;
    for (int r = 0; r < kSortRounds; ++r) {
        __syncthreads();  // the previous round's reads of s_warp end before it is cleared
        for (int i = tid; i < kSortWarps * num_keys; i += kSortThreads) s_warp[i] = 0;
        __syncthreads();
        const int64_t p = base + static_cast<int64_t>(r) * kSortThreads + tid;
        int key = p < n ? keys[p] : -1;
        if (key >= num_keys) key = -1;
        const unsigned peers = __match_any_sync(0xffffffffu, key);
        const int lane_rank = __popc(peers & ((1u << lane) - 1u));
        if (key >= 0 && lane_rank == 0) s_warp[warp * num_keys + key] = __popc(peers);
        __syncthreads();
        if (p < n) {
            int rank = -1;
            if (key >= 0) {
                rank = s_running[key] + lane_rank;
                for (int w = 0; w < warp; ++w) rank += s_warp[w * num_keys + key];
            }
            local_rank[p] = rank;
        }
        __syncthreads();
        for (int i = tid; i < num_keys; i += kSortThreads) {
            int add = 0;
#pragma unroll
            for (int w = 0; w < kSortWarps; ++w) add += s_warp[w * num_keys + i];
            s_running[i] += add;
        }
    }
    __syncthreads();
    for (int i = tid; i < num_keys; i += kSortThreads) hist[static_cast<int64_t>(blockIdx.x) * num_keys + i] = s_running[i];
}

// One block of 1024 threads. hist [num_blocks][num_keys] becomes the exclusive prefix over blocks; totals[key]
// gets the key's count; seg_start (optional) [num_keys + 1] the exclusive scan of totals.
// If offsets (optional, [num_keys]) is given: base[key] = offsets[key]; offsets[key] = (offsets + total) % period.
static __global__ void __launch_bounds__(1024) scan_kernel(int32_t* __restrict__ hist, int num_blocks, int num_keys,
                                                    int32_t* __restrict__ totals, int32_t* __restrict__ seg_start,
                                                    int32_t* __restrict__ offsets, int32_t* __restrict__ base,
                                                    int period) {
    __shared__ int32_t s_tot[kMaxKeys];
    for (int key = threadIdx.x; key < num_keys; key += blockDim.x) {
        int32_t running = 0;
        int b = 0;
        for (; b + 8 <= num_blocks; b += 8) {
            int32_t v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = hist[static_cast<int64_t>(b + u) * num_keys + key];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                hist[static_cast<int64_t>(b + u) * num_keys + key] = running;
                running += v[u];
            }
        }
        for (; b < num_blocks; ++b) {
            const int32_t v = hist[static_cast<int64_t>(b) * num_keys + key];
            hist[static_cast<int64_t>(b) * num_keys + key] = running;
            running += v;
        }
        totals[key] = running;
        s_tot[key] = running;
        if (offsets) {
            const int32_t o = offsets[key];
            base[key] = o;
            offsets[key] = static_cast<int32_t>((static_cast<int64_t>(o) + running) % period);
        }
    }
    if (!seg_start) return;
    __syncthreads();
    if (threadIdx.x == 0) {  // num_keys <= 1024: a serial scan costs ~1 us and is obviously right
        int32_t acc = 0;
        for (int key = 0; key < num_keys; ++key) {
            seg_start[key] = acc;
            acc += s_tot[key];
        }
        seg_start[num_keys] = acc;
    }
}

inline size_t block_rank_smem(int num_keys) { return sizeof(int32_t) * static_cast<size_t>(num_keys) * (1 + kSortWarps); }

}  // namespace grace::cuda::detail
