#include "grace/engine_routing.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "grace/error.hpp"
#include "rng.hpp"

namespace grace {

// ---------------------------------------------------------------------------------------------------------------
// CPython's Mersenne Twister (Modules/_randommodule.c) and the integer draws of Lib/random.py.

namespace {
constexpr int kN = 624, kM = 397;
}  // namespace

PyRandom::PyRandom(uint64_t seed) {
    // init_genrand(19650218), then init_by_array over the seed's 32-bit words, least significant first (CPython
    // drops leading zero words but keeps at least one).
    mt_[0] = 19650218u;
    for (int i = 1; i < kN; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + static_cast<uint32_t>(i);
    const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    const int key_len = key[1] != 0 ? 2 : 1;
    int i = 1, j = 0;
    for (int k = std::max(kN, key_len); k > 0; --k) {
        mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + static_cast<uint32_t>(j);
        ++i, ++j;
        if (i >= kN) mt_[0] = mt_[kN - 1], i = 1;
        if (j >= key_len) j = 0;
    }
    for (int k = kN - 1; k > 0; --k) {
        mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - static_cast<uint32_t>(i);
        ++i;
        if (i >= kN) mt_[0] = mt_[kN - 1], i = 1;
    }
    mt_[0] = 0x80000000u;
    index_ = kN;
}

uint32_t PyRandom::next_u32() {
    if (index_ >= kN) {
        auto mix = [&](int a, int b, int c) {
            const uint32_t y = (mt_[a] & 0x80000000u) | (mt_[b] & 0x7fffffffu);
            mt_[a] = mt_[c] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        };
        int kk = 0;
        for (; kk < kN - kM; ++kk) mix(kk, kk + 1, kk + kM);
        for (; kk < kN - 1; ++kk) mix(kk, kk + 1, kk + (kM - kN));
        mix(kN - 1, 0, kM - 1);
        index_ = 0;
    }
    uint32_t y = mt_[index_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t PyRandom::getrandbits(int k) {
    GRACE_CHECK_ARG(k >= 1 && k <= 64, "getrandbits supports 1 to 64 bits, got ", k);
    if (k <= 32) return next_u32() >> (32 - k);
    // Words least significant first; the last word keeps its top (k - 32) bits.
    const uint64_t low = next_u32();
    const uint64_t high = next_u32() >> (64 - k);
    return low | (high << 32);
}

int64_t PyRandom::randbelow(int64_t n) {
    GRACE_CHECK_ARG(n >= 1, "randbelow needs n >= 1, got ", n);
    int bits = 0;
    for (uint64_t v = static_cast<uint64_t>(n); v; v >>= 1) ++bits;  // n.bit_length()
    uint64_t r = getrandbits(bits);
    while (r >= static_cast<uint64_t>(n)) r = getrandbits(bits);
    return static_cast<int64_t>(r);
}

std::vector<int> PyRandom::sample(const std::vector<int>& population, int k) {
    const int n = static_cast<int>(population.size());
    GRACE_CHECK_ARG(k >= 0 && k <= n, "sample of ", k, " from a population of ", n);
    std::vector<int> result(static_cast<size_t>(k));
    // CPython picks the method by comparing n with the size of a k-element set.
    int64_t setsize = 21;
    if (k > 5) setsize += static_cast<int64_t>(std::pow(4.0, std::ceil(std::log(3.0 * k) / std::log(4.0))));
    if (n <= setsize) {
        std::vector<int> pool = population;
        for (int i = 0; i < k; ++i) {
            const int64_t j = randbelow(n - i);
            result[i] = pool[j];
            pool[j] = pool[n - i - 1];
        }
    } else {
        std::unordered_set<int64_t> selected;
        for (int i = 0; i < k; ++i) {
            int64_t j = randbelow(n);
            while (selected.count(j)) j = randbelow(n);
            selected.insert(j);
            result[i] = population[j];
        }
    }
    return result;
}

std::vector<int> sglang_fair_choices(const std::vector<int>& arr, int k, PyRandom& rng) {
    GRACE_CHECK_ARG(!arr.empty() && k >= 0, "fair choices need candidates and k >= 0");
    const int n = static_cast<int>(arr.size());
    std::vector<int> out;
    out.reserve(k);
    for (int q = 0; q < k / n; ++q) out.insert(out.end(), arr.begin(), arr.end());
    const auto extra = rng.sample(arr, k % n);
    out.insert(out.end(), extra.begin(), extra.end());
    rng.shuffle(out);
    return out;
}

// ---------------------------------------------------------------------------------------------------------------

SlotMap slot_map_of(const LayerPlan& layer) {
    SlotMap m;
    for (size_t g = 0; g < layer.gpu_experts.size(); ++g)
        for (int e : layer.gpu_experts[g]) {
            m.slot_expert.push_back(e);
            m.slot_gpu.push_back(static_cast<int>(g));
        }
    return m;
}

namespace {

// [E]: each expert's slots in ascending order; checks ids and that every expert has a slot.
std::vector<std::vector<int>> expert_slots(const SlotMap& m, int num_experts, int num_gpus, int layer) {
    GRACE_CHECK_INPUT(m.slot_expert.size() == m.slot_gpu.size(), "layer ", layer, ": ", m.slot_expert.size(),
                      " slot experts but ", m.slot_gpu.size(), " slot GPUs");
    std::vector<std::vector<int>> out(num_experts);
    for (size_t p = 0; p < m.slot_expert.size(); ++p) {
        const int e = m.slot_expert[p], g = m.slot_gpu[p];
        GRACE_CHECK_INPUT(e >= 0 && e < num_experts, "layer ", layer, ": physical slot ", p, " holds expert ", e,
                          ", outside [0, ", num_experts, ")");
        GRACE_CHECK_INPUT(g >= 0 && g < num_gpus, "layer ", layer, ": physical slot ", p, " is on GPU ", g,
                          ", outside [0, ", num_gpus, ")");
        out[e].push_back(static_cast<int>(p));
    }
    for (int e = 0; e < num_experts; ++e)
        GRACE_CHECK_INPUT(!out[e].empty(), "layer ", layer, ": expert ", e, " has no physical slot");
    return out;
}

}  // namespace

std::vector<int> sglang_dispatch_tables(const std::vector<SlotMap>& layers, int num_experts, const Topology& topology,
                                        bool nearest, uint64_t seed) {
    const int G = topology.num_gpus(), E = num_experts, L = static_cast<int>(layers.size());
    GRACE_CHECK_ARG(E >= 1, "SGLang dispatch needs at least one expert");
    PyRandom rng(seed);
    std::vector<int> out(static_cast<size_t>(L) * G * E, -1);
    std::vector<int> remaining;
    for (int l = 0; l < L; ++l) {
        const SlotMap& m = layers[l];
        const auto cands = expert_slots(m, E, G, l);
        for (int e = 0; e < E; ++e) {
            const std::vector<int>& c = cands[e];
            auto at = [&](int g) -> int& { return out[(static_cast<size_t>(l) * G + g) * E + e]; };
            remaining.clear();
            for (int g = 0; g < G; ++g) {
                int pick = -1;
                if (nearest && c.size() == 1) pick = c[0];
                for (size_t i = 0; pick < 0 && i < c.size(); ++i)
                    if (m.slot_gpu[c[i]] == g) pick = c[i];
                if (nearest && pick < 0) {
                    // Same node only when it narrows the candidate set.
                    int first = -1, count = 0;
                    for (int p : c)
                        if (topology.node_of(m.slot_gpu[p]) == topology.node_of(g)) {
                            if (count++ == 0) first = p;
                        }
                    if (count > 0 && count < static_cast<int>(c.size())) pick = first;
                }
                at(g) = pick;
                if (pick < 0) remaining.push_back(g);
            }
            if (remaining.empty()) continue;  // SGLang's call with k = 0 draws nothing
            const auto choices = sglang_fair_choices(c, static_cast<int>(remaining.size()), rng);
            for (size_t i = 0; i < remaining.size(); ++i) at(remaining[i]) = choices[i];
        }
    }
    return out;
}

bool is_engine_policy(RoutingPolicy policy) {
    switch (policy) {
        case RoutingPolicy::kSglangStatic:
        case RoutingPolicy::kSglangNearest:
        case RoutingPolicy::kSglangDynamic:
        case RoutingPolicy::kVllm:
        case RoutingPolicy::kVllmAscend:
        case RoutingPolicy::kTrtllm:
            return true;
        default:
            return false;
    }
}

EngineLayerRouter::EngineLayerRouter(SlotMap slots, int num_experts, const Topology& topology, RoutingPolicy policy,
                                     uint64_t seed, std::vector<int> fixed)
    : slots_(std::move(slots)),
      num_experts_(num_experts),
      num_gpus_(topology.num_gpus()),
      policy_(policy),
      seed_(seed),
      fixed_(std::move(fixed)) {
    GRACE_CHECK_ARG(is_engine_policy(policy), "'", to_string(policy), "' is not an engine routing policy");
    replicas_ = expert_slots(slots_, num_experts_, num_gpus_, -1);
    const size_t pairs = static_cast<size_t>(num_gpus_) * num_experts_;
    if (policy == RoutingPolicy::kSglangStatic || policy == RoutingPolicy::kSglangNearest) {
        GRACE_CHECK_ARG(fixed_.size() == pairs, "SGLang static routing needs a [G, E] table of ", pairs, " slots, got ",
                        fixed_.size());
    } else if (policy == RoutingPolicy::kVllmAscend) {
        // Holders of e by ascending rank; a rank holding e twice is listed once, with its last slot (the expert
        // map assignment keeps the last write).
        fixed_.assign(pairs, -1);
        for (int e = 0; e < num_experts_; ++e) {
            std::vector<int> holders;
            for (int p : replicas_[e]) {
                if (!holders.empty() && slots_.slot_gpu[holders.back()] == slots_.slot_gpu[p])
                    holders.back() = p;
                else
                    holders.push_back(p);
            }
            std::sort(holders.begin(), holders.end(),
                      [&](int a, int b) { return slots_.slot_gpu[a] < slots_.slot_gpu[b]; });
            for (int r = 0; r < num_gpus_; ++r)
                fixed_[static_cast<size_t>(r) * num_experts_ + e] = holders[r % holders.size()];
        }
    } else {
        fixed_.clear();
    }
    reset();
}

void EngineLayerRouter::reset() {
    block_.assign(num_gpus_, -1);
    block_count_.assign(static_cast<size_t>(num_gpus_) * num_experts_, 0);
}

bool EngineLayerRouter::fixed_per_source() const {
    return policy_ == RoutingPolicy::kSglangStatic || policy_ == RoutingPolicy::kSglangNearest ||
           policy_ == RoutingPolicy::kVllmAscend;
}

int EngineLayerRouter::route(int source, int expert, int64_t local_token, int j, int top_k) {
    const std::vector<int>& reps = replicas_[expert];
    const uint64_t n = reps.size();
    switch (policy_) {
        case RoutingPolicy::kSglangStatic:
        case RoutingPolicy::kSglangNearest:
        case RoutingPolicy::kVllmAscend:
            return fixed_[static_cast<size_t>(source) * num_experts_ + expert];
        case RoutingPolicy::kVllm: {
            // Knuth multiplicative hash of the token's index in its rank's batch, kept to 32 bits.
            const uint64_t hashed = (static_cast<uint64_t>(local_token) * 2654435769ULL) & 0xffffffffULL;
            return reps[hashed % n];
        }
        case RoutingPolicy::kTrtllm: {
            if (n == 1) return reps[0];
            const int64_t flat = local_token * top_k + j;
            const int64_t block = flat / 1024;
            if (block_[source] != block) {
                block_[source] = block;
                std::fill_n(block_count_.begin() + static_cast<size_t>(source) * num_experts_, num_experts_, 0);
            }
            const int64_t c = block_count_[static_cast<size_t>(source) * num_experts_ + expert]++;
            return reps[static_cast<uint64_t>(block + source + c) % n];
        }
        case RoutingPolicy::kSglangDynamic: {
            // torch.randint(0, 65536) % n in SGLang; a seeded hash here.
            const uint64_t draw = mix64(seed_ ^ 0x5eed5eedULL, static_cast<uint64_t>(local_token) * 1024 + j,
                                        (static_cast<uint64_t>(source) << 32) | static_cast<uint64_t>(expert)) &
                                  0xffffULL;
            return reps[draw % n];
        }
        default:
            break;
    }
    GRACE_ASSERT(false);
    return reps[0];
}

std::vector<std::unique_ptr<EngineLayerRouter>> make_engine_routers(const std::vector<SlotMap>& layers, int num_experts,
                                                                    const Topology& topology, RoutingPolicy policy,
                                                                    uint64_t seed) {
    GRACE_CHECK_ARG(is_engine_policy(policy), "'", to_string(policy), "' is not an engine routing policy");
    const bool sglang_static = policy == RoutingPolicy::kSglangStatic || policy == RoutingPolicy::kSglangNearest;
    std::vector<int> tables;
    if (sglang_static)
        tables = sglang_dispatch_tables(layers, num_experts, topology, policy == RoutingPolicy::kSglangNearest);
    const size_t per_layer = static_cast<size_t>(topology.num_gpus()) * num_experts;
    std::vector<std::unique_ptr<EngineLayerRouter>> out;
    for (size_t l = 0; l < layers.size(); ++l) {
        expert_slots(layers[l], num_experts, topology.num_gpus(), static_cast<int>(l));  // errors name the layer
        std::vector<int> fixed;
        if (sglang_static) fixed.assign(tables.begin() + l * per_layer, tables.begin() + (l + 1) * per_layer);
        out.push_back(
            std::make_unique<EngineLayerRouter>(layers[l], num_experts, topology, policy, seed, std::move(fixed)));
    }
    return out;
}

}  // namespace grace
