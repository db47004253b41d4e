#pragma once
// The profiler's counting kernel (internal). Counts, per layer, the pairs of router positions a < b of every token's
// top-k set into per-thread uint16 tables of E*E cells (32 KiB for E = 128: one layer's table stays in L1
// while a block of tokens is counted), flushed into per-thread int64 tables before a cell can overflow.
// Integer sums do not depend on the order they are added in, so the result is the same for any thread count.

#include <cstdint>
#include <vector>

namespace grace::detail {

/// Accumulates pair counts (upper triangle, i < j) and optional per-source-GPU loads over chunks of a trace.
class PairCounter {
  public:
    /// `num_gpus` > 0 also counts per-source loads with home_gpu(t, total_tokens, num_gpus).
    PairCounter(int num_layers, int num_experts, int top_k, int64_t total_tokens, int num_gpus, int num_threads);

    /// Counts `num_tokens` tokens of ids [num_tokens, L, k] whose first token is `first_token` of the trace.
    /// Throws kInvalidInput for an id out of range or repeated within a token's top-k (first one in token order).
    void add(const int32_t* ids, int64_t num_tokens, int64_t first_token);

    /// Pair counts [L, E, E], upper triangle only (i < j), summed over threads (lower triangle and diagonal 0).
    std::vector<int64_t> upper_pairs() const;
    /// Loads counted directly [L, E] (only filled when top_k == 1; otherwise derive from the pairs).
    std::vector<int64_t> direct_load() const;
    /// Per-source loads [L, G, E] (empty when num_gpus == 0).
    std::vector<int64_t> source_load() const;
    int64_t tokens_seen() const { return tokens_seen_; }

  private:
    struct ThreadState;
    void flush(ThreadState& s);
    int L_, E_, k_, G_, threads_;
    int64_t total_tokens_;
    int64_t tokens_seen_ = 0;
    std::vector<ThreadState> states_;

  public:
    ~PairCounter();
    PairCounter(const PairCounter&) = delete;
    PairCounter& operator=(const PairCounter&) = delete;
};

}  // namespace grace::detail
