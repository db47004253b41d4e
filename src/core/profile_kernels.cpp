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
    int64_t pending = 0;          // tokens counted into `small` since the last flush
    std::vector<uint16_t> small;  // [layers, E, E]
    std::vector<int64_t> wide;    // [layers, E, E]
    std::vector<int64_t> load;    // [layers, E] (top_k == 1 only)
    std::vector<int64_t> source;  // [layers, G, E]
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

namespace {

/// Counts one layer of tokens [b0, b1): for positions a < b, cell (r[a], r[b]) += 1 (ordered by position, not
/// by id, so no sort: the two orders are folded together at the end). A repeated id lands on the diagonal,
/// which the caller checks. Returns false (before touching the table) at the first token with an id outside
/// [0, E). K > 0 fixes k at compile time so the pair loops unroll.
template <int K>
bool count_layer(const int32_t* ids, int64_t row, int l, int k_rt, int64_t b0, int64_t b1, uint32_t uE, uint16_t* table,
                 int64_t* source, int G, int64_t first_token, int64_t total_tokens) {
    const int k = K > 0 ? K : k_rt;
    const size_t E = uE;
    for (int64_t t = b0; t < b1; ++t) {
        const int32_t* r = ids + t * row + static_cast<int64_t>(l) * k;
        uint32_t v[kMaxK];
        bool bad = false;
        for (int a = 0; a < k; ++a) {
            v[a] = static_cast<uint32_t>(r[a]);
            bad |= v[a] >= uE;
        }
        if (bad) return false;
        if (table) {
            if constexpr (K > 0) {
#pragma GCC unroll 64
                for (int a = 0; a + 1 < K; ++a) {
                    uint16_t* trow = table + v[a] * E;
#pragma GCC unroll 64
                    for (int b = a + 1; b < K; ++b) ++trow[v[b]];
                }
            } else {
                for (int a = 0; a + 1 < k; ++a) {
                    uint16_t* trow = table + v[a] * E;
                    for (int b = a + 1; b < k; ++b) ++trow[v[b]];
                }
            }
        }
        if (source) {
            int64_t* src = source + static_cast<size_t>(home_gpu(first_token + t, total_tokens, G)) * E;
            for (int a = 0; a < k; ++a) ++src[v[a]];
        }
    }
    return true;
}

using CountFn = bool (*)(const int32_t*, int64_t, int, int, int64_t, int64_t, uint32_t, uint16_t*, int64_t*, int,
                         int64_t, int64_t);

CountFn count_fn(int k) {
    switch (k) {
        case 2:
            return count_layer<2>;
        case 4:
            return count_layer<4>;
        case 6:
            return count_layer<6>;
        case 8:
            return count_layer<8>;
        default:
            return count_layer<0>;
    }
}

/// Slow path after a violation in a block: the first bad (token, layer) in token order among layers [l0, l1).
BadId find_bad(const int32_t* ids, int64_t row, int k, int l0, int l1, int64_t b0, int64_t b1, uint32_t uE,
               int64_t first_token) {
    for (int64_t t = b0; t < b1; ++t)
        for (int l = l0; l < l1; ++l) {
            const int32_t* r = ids + t * row + static_cast<int64_t>(l) * k;
            for (int a = 0; a < k; ++a) {
                BadId found;
                found.token = first_token + t;
                found.layer = l;
                found.id = r[a];
                if (static_cast<uint32_t>(r[a]) >= uE) return found;
                for (int c = 0; c < a; ++c)
                    if (r[c] == r[a]) {
                        found.repeated = true;
                        return found;
                    }
            }
        }
    return BadId{};
}

}  // namespace

void PairCounter::add(const int32_t* ids, int64_t num_tokens, int64_t first_token) {
    GRACE_CHECK_ARG(first_token >= 0 && first_token + num_tokens <= total_tokens_, "chunk [", first_token, ", ",
                    first_token + num_tokens, ") lies outside the trace of ", total_tokens_, " tokens");
    const int L = L_, E = E_, k = k_, G = G_;
    const int token_groups = threads_ / std::min(threads_, L_);
    const int64_t row = static_cast<int64_t>(L) * k;
    const uint32_t uE = static_cast<uint32_t>(E);
    const CountFn count = count_fn(k);
    const int64_t pairs_per_token = static_cast<int64_t>(k) * (k - 1) / 2;

    auto work = [&](ThreadState& s) {
        const int64_t t_begin = num_tokens * s.token_group / token_groups;
        const int64_t t_end = num_tokens * (s.token_group + 1) / token_groups;
        const int nl = s.layer_end - s.layer_begin;
        // A block's share of the rows (~256 KiB) stays in L2 while its layers are counted one by one. The block
        // is also small enough that a repeated id cannot wrap a diagonal cell back to 0 within it.
        int64_t block = std::clamp<int64_t>((256 << 10) / std::max<int64_t>(1, nl * k * 4), 16, 4096);
        if (pairs_per_token > 0) block = std::max<int64_t>(1, std::min(block, kFlushEvery / pairs_per_token));
        for (int64_t b0 = t_begin; b0 < t_end; b0 += block) {
            const int64_t b1 = std::min(t_end, b0 + block);
            if (k >= 2 && s.pending + (b1 - b0) > kFlushEvery) flush(s);
            bool ok = true;
            for (int li = 0; li < nl && ok; ++li) {
                const int l = s.layer_begin + li;
                uint16_t* table = k >= 2 ? s.small.data() + static_cast<size_t>(li) * E * E : nullptr;
                int64_t* source = G > 0 ? s.source.data() + static_cast<size_t>(li) * G * E : nullptr;
                ok = count(ids, row, l, k, b0, b1, uE, table, source, G, first_token, total_tokens_);
                if (ok && table)
                    for (int i = 0; i < E; ++i) ok &= table[static_cast<size_t>(i) * E + i] == 0;
                if (ok && k == 1) {
                    int64_t* load = s.load.data() + static_cast<size_t>(li) * E;
                    for (int64_t t = b0; t < b1; ++t) ++load[ids[t * row + l]];
                }
            }
            if (!ok) {
                s.bad = find_bad(ids, row, k, s.layer_begin, s.layer_end, b0, b1, uE, first_token);
                break;
            }
            s.pending += b1 - b0;
        }
    };
    // Small chunks are not worth waking the team (and spinning workers hurt on a busy machine).
    if (num_tokens * row >= (int64_t{1} << 16) && threads_ > 1) {
#pragma omp parallel num_threads(threads_)
        work(states_[omp_get_thread_num()]);
    } else {
        for (auto& s : states_) work(s);
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
    // Cells count pairs by router position; fold (i, j) and (j, i) into the upper triangle.
    for (const auto& s : states_) {
        const size_t nl = s.layer_end - s.layer_begin;
        for (size_t li = 0; li < nl; ++li) {
            int64_t* dst = out.data() + (s.layer_begin + li) * ee;
            const int64_t* w = s.wide.data() + li * ee;
            const uint16_t* sm = s.small.data() + li * ee;
            for (int i = 0; i < E_; ++i)
                for (int j = i + 1; j < E_; ++j) {
                    const size_t ij = static_cast<size_t>(i) * E_ + j, ji = static_cast<size_t>(j) * E_ + i;
                    dst[ij] += w[ij] + sm[ij] + w[ji] + sm[ji];
                }
        }
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
