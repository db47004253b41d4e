#include "core/profile_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <limits>

#include "grace/error.hpp"
#include "grace/topology.hpp"

namespace grace::detail {

namespace {

constexpr int64_t kFlushEvery = std::numeric_limits<uint16_t>::max();  // a cell grows by <= 1 per token
constexpr int kMaxK = 64;

struct BadId {
    int64_t token = std::numeric_limits<int64_t>::max();
    int layer = 0;
    int32_t id = 0;
    bool repeated = false;
};

}  // namespace

/// One worker's share: a contiguous range of layers and, within every chunk, a contiguous range of tokens.
struct PairCounter::ThreadState {
    int layer_begin = 0, layer_end = 0;
    int token_group = 0;
    int64_t pending = 0;            // tokens counted into `small` since the last flush
    std::vector<uint16_t> small;    // [layers, E, E]
    std::vector<int64_t> wide;      // [layers, E, E]
    std::vector<int64_t> load;      // [layers, E] (top_k == 1 only)
    std::vector<int64_t> source;    // [layers, G, E]
    BadId bad;
};

PairCounter::~PairCounter() = default;

PairCounter::PairCounter(int num_layers, int num_experts, int top_k, int64_t total_tokens, int num_gpus,
                         int num_threads)
    : L_(num_layers), E_(num_experts), k_(top_k), G_(num_gpus), total_tokens_(total_tokens) {
    GRACE_CHECK_INPUT(top_k >= 1 && top_k <= num_experts, "top_k = ", top_k, " must lie in [1, E = ", num_experts, "]");
    GRACE_CHECK_INPUT(top_k <= kMaxK, "top_k = ", top_k, " exceeds the supported maximum ", kMaxK);
    GRACE_CHECK_ARG(num_gpus >= 0, "number of GPUs must be >= 0");
    threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();
    // Split layers first (each worker's tables then cover only its layers and stay cache-resident); split
    // tokens only when there are more workers than layers.
    const int layer_groups = std::min(threads_, L_);
    const int token_groups = std::max(1, threads_ / layer_groups);
    threads_ = layer_groups * token_groups;
    states_.resize(threads_);
    const size_t ee = static_cast<size_t>(E_) * E_;
    for (int w = 0; w < threads_; ++w) {
        ThreadState& s = states_[w];
        int lg = w / token_groups;
        s.token_group = w % token_groups;
        s.layer_begin = static_cast<int>(static_cast<int64_t>(lg) * L_ / layer_groups);
        s.layer_end = static_cast<int>(static_cast<int64_t>(lg + 1) * L_ / layer_groups);
        const size_t nl = s.layer_end - s.layer_begin;
        if (k_ >= 2) {
            s.small.assign(nl * ee, 0);
            s.wide.assign(nl * ee, 0);
        } else {
            s.load.assign(nl * E_, 0);
        }
        if (G_ > 0) s.source.assign(nl * G_ * E_, 0);
    }
}

void PairCounter::flush(ThreadState& s) {
    const size_t n = s.small.size();
    for (size_t i = 0; i < n; ++i) s.wide[i] += s.small[i];
    std::fill(s.small.begin(), s.small.end(), 0);
    s.pending = 0;
}

void PairCounter::add(const int32_t* ids, int64_t num_tokens, int64_t first_token) {
    GRACE_CHECK_ARG(first_token >= 0 && first_token + num_tokens <= total_tokens_, "chunk [", first_token, ", ",
                    first_token + num_tokens, ") lies outside the trace of ", total_tokens_, " tokens");
    const int L = L_, E = E_, k = k_, G = G_;
    const int token_groups = threads_ / std::min(threads_, L_);
    const int64_t row = static_cast<int64_t>(L) * k;
    const uint32_t uE = static_cast<uint32_t>(E);

#pragma omp parallel num_threads(threads_)
    {
        ThreadState& s = states_[omp_get_thread_num()];
        const int64_t t_begin = num_tokens * s.token_group / token_groups;
        const int64_t t_end = num_tokens * (s.token_group + 1) / token_groups;
        const int nl = s.layer_end - s.layer_begin;
        // A block's share of the rows (~256 KiB) stays in L2 while its layers are counted one by one.
        const int64_t block = std::clamp<int64_t>((256 << 10) / std::max<int64_t>(1, nl * k * 4), 16, 4096);
        int32_t sorted[kMaxK];
        bool ok = true;
        for (int64_t b0 = t_begin; b0 < t_end && ok; b0 += block) {
            const int64_t b1 = std::min(t_end, b0 + block);
            if (k >= 2 && s.pending + (b1 - b0) > kFlushEvery) flush(s);
            for (int li = 0; li < nl && ok; ++li) {
                const int l = s.layer_begin + li;
                uint16_t* table = k >= 2 ? s.small.data() + static_cast<size_t>(li) * E * E : nullptr;
                for (int64_t t = b0; t < b1; ++t) {
                    const int32_t* r = ids + t * row + static_cast<int64_t>(l) * k;
                    // Insertion sort of k ids (k is small), then range and repeat checks on the sorted ids.
                    for (int a = 0; a < k; ++a) {
                        int32_t v = r[a];
                        int c = a;
                        while (c > 0 && sorted[c - 1] > v) {
                            sorted[c] = sorted[c - 1];
                            --c;
                        }
                        sorted[c] = v;
                    }
                    bool bad = static_cast<uint32_t>(sorted[0]) >= uE || static_cast<uint32_t>(sorted[k - 1]) >= uE;
                    for (int a = 1; a < k; ++a) bad |= sorted[a] == sorted[a - 1];
                    if (bad) {
                        // Record the first violation in token order; other workers may find earlier ones.
                        BadId found;
                        found.token = first_token + t;
                        found.layer = l;
                        for (int a = 0; a < k && !found.repeated; ++a) {
                            if (static_cast<uint32_t>(r[a]) >= uE) {
                                found.id = r[a];
                                break;
                            }
                            for (int c = 0; c < a; ++c)
                                if (r[c] == r[a]) {
                                    found.id = r[a];
                                    found.repeated = true;
                                    break;
                                }
                        }
                        if (found.token < s.bad.token || (found.token == s.bad.token && found.layer < s.bad.layer))
                            s.bad = found;
                        ok = false;
                        break;
                    }
                    if (k >= 2) {
                        for (int a = 0; a + 1 < k; ++a) {
                            uint16_t* trow = table + static_cast<size_t>(sorted[a]) * E;
                            for (int c = a + 1; c < k; ++c) ++trow[sorted[c]];
                        }
                    } else {
                        ++s.load[static_cast<size_t>(li) * E + sorted[0]];
                    }
                    if (G > 0) {
                        int g = home_gpu(first_token + t, total_tokens_, G);
                        int64_t* src = s.source.data() + (static_cast<size_t>(li) * G + g) * E;
                        for (int a = 0; a < k; ++a) ++src[sorted[a]];
                    }
                }
            }
            s.pending += b1 - b0;
        }
    }
    BadId first;
    for (const auto& s : states_)
        if (s.bad.token < first.token || (s.bad.token == first.token && s.bad.layer < first.layer)) first = s.bad;
    if (first.token != std::numeric_limits<int64_t>::max()) {
        for (auto& s : states_) s.bad = BadId{};
        if (first.repeated)
            GRACE_CHECK_INPUT(false, "expert id ", first.id, " is repeated in the top-k of token ", first.token,
                              ", layer ", first.layer);
        GRACE_CHECK_INPUT(false, "expert id ", first.id, " at token ", first.token, ", layer ", first.layer,
                          " is out of range [0, ", E, ")");
    }
    tokens_seen_ += num_tokens;
}

std::vector<int64_t> PairCounter::upper_pairs() const {
    const size_t ee = static_cast<size_t>(E_) * E_;
    std::vector<int64_t> out(static_cast<size_t>(L_) * ee, 0);
    if (k_ < 2) return out;
    for (const auto& s : states_) {
        int64_t* dst = out.data() + static_cast<size_t>(s.layer_begin) * ee;
        for (size_t i = 0; i < s.wide.size(); ++i) dst[i] += s.wide[i] + s.small[i];
    }
    return out;
}

std::vector<int64_t> PairCounter::direct_load() const {
    std::vector<int64_t> out(static_cast<size_t>(L_) * E_, 0);
    for (const auto& s : states_) {
        int64_t* dst = out.data() + static_cast<size_t>(s.layer_begin) * E_;
        for (size_t i = 0; i < s.load.size(); ++i) dst[i] += s.load[i];
    }
    return out;
}

std::vector<int64_t> PairCounter::source_load() const {
    if (G_ == 0) return {};
    const size_t ge = static_cast<size_t>(G_) * E_;
    std::vector<int64_t> out(static_cast<size_t>(L_) * ge, 0);
    for (const auto& s : states_) {
        int64_t* dst = out.data() + static_cast<size_t>(s.layer_begin) * ge;
        for (size_t i = 0; i < s.source.size(); ++i) dst[i] += s.source[i];
    }
    return out;
}

}  // namespace grace::detail
