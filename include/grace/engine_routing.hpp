#pragma once
/// @file engine_routing.hpp
/// The serving engines' own replica choice, modelled exactly on the physical placement they load (docs/deploy.md
/// names the engine file and commit each rule was read from):
///
///   sglang-static   SGLang's legacy static dispatch: per (rank, expert) one fixed slot: the first slot (ascending
///                   physical id) on the rank's own GPU, else one drawn by `_fair_choices` (every rank without a
///                   local slot gets a slot; the slots are spread evenly over those ranks, order shuffled) from one
///                   CPython `random.Random(42)` that runs over all layers and experts in order.
///   sglang-nearest  SGLang's newer `_find_nearest_expert`: as static, but a rank with no slot on its GPU takes the
///                   first slot on its node when that narrows the candidates; a single-slot expert draws nothing.
///   sglang-dynamic  SGLang's dynamic dispatch: a uniformly random slot per selection (torch.randint in SGLang;
///                   here a seeded hash, so the distribution is exact, the individual picks are not SGLang's).
///   vllm            vLLM's EPLB map: slot index ((local token index * 2654435769) mod 2^32) mod n_e over the
///                   expert's slots in ascending order.
///   vllm-ascend     vLLM-Ascend's `generate_log2phy_map`: rank r uses, for every selection of expert e, the
///                   (r mod n_e)-th of the ranks holding e (ascending), whether or not r holds e itself.
///   trtllm          TensorRT-LLM's load-balancer routing kernel with attention DP: the rank's flat selections
///                   (token-major) in blocks of 1024; in block b the c-th selection of e (in flat order) takes
///                   replica (b + rank + c) mod n_e over e's slots in ascending order.
///
/// "Local token index" is a token's position among the tokens of its own GPU (what a data-parallel rank sees).

#include <cstdint>
#include <memory>
#include <vector>

#include "grace/plan.hpp"
#include "grace/topology.hpp"

namespace grace {

/// CPython's `random.Random` (MT19937 with CPython's seeding and integer draws), bit for bit: the same seed and
/// the same calls give the numbers `random.Random(seed)` gives on CPython 3.2 or later.
class PyRandom {
  public:
    /// random.Random(seed) for a non-negative integer seed (init_by_array over the seed's 32-bit words).
    explicit PyRandom(uint64_t seed);
    /// The next 32-bit output (genrand_uint32).
    uint32_t next_u32();
    /// random.getrandbits(k), 1 <= k <= 64. Throws kInvalidArgument outside.
    uint64_t getrandbits(int k);
    /// random._randbelow(n) (rejection sampling on getrandbits(n.bit_length())), n >= 1.
    int64_t randbelow(int64_t n);
    /// random.shuffle(x).
    template <class T>
    void shuffle(std::vector<T>& x) {
        for (size_t i = x.size(); i-- > 1;)
            std::swap(x[i], x[static_cast<size_t>(randbelow(static_cast<int64_t>(i) + 1))]);
    }
    /// random.sample(population, k), 0 <= k <= population size: CPython's pool or set method, chosen as it does.
    std::vector<int> sample(const std::vector<int>& population, int k);

  private:
    uint32_t mt_[624];
    int index_ = 624;
};

/// SGLang's `_fair_choices(arr, k, r)`: arr repeated k / n times plus r.sample(arr, k mod n), then shuffled.
std::vector<int> sglang_fair_choices(const std::vector<int>& arr, int k, PyRandom& rng);

/// One layer of a physical placement: which expert and GPU each physical slot holds (slots in engine order).
struct SlotMap {
    std::vector<int> slot_expert;  ///< [P]
    std::vector<int> slot_gpu;     ///< [P]
};

/// The slots of a plan layer in the order the export writes them: GPU by GPU, each GPU's experts ascending.
SlotMap slot_map_of(const LayerPlan& layer);

/// SGLang's static dispatch tables for a whole model: [L][G][E] physical slot chosen by rank g for expert e of
/// layer l, one random.Random(seed) over all layers (SGLang: seed 42). `nearest` selects the newer
/// `_find_nearest_expert` variant. Throws kInvalidInput for an expert with no slot or a slot id out of range.
std::vector<int> sglang_dispatch_tables(const std::vector<SlotMap>& layers, int num_experts, const Topology& topology,
                                        bool nearest, uint64_t seed = 42);

/// True for the engine policies: sglang-static, sglang-nearest, sglang-dynamic, vllm, vllm-ascend, trtllm.
bool is_engine_policy(RoutingPolicy policy);

/// Stateful router of one layer under an engine policy: picks a physical slot. Deterministic.
class EngineLayerRouter {
  public:
    /// `fixed` [G][E] is the per-(rank, expert) slot table for the SGLang static policies (empty otherwise).
    EngineLayerRouter(SlotMap slots, int num_experts, const Topology& topology, RoutingPolicy policy, uint64_t seed,
                      std::vector<int> fixed = {});
    /// Slot chosen for selection j of the token with local index `local_token` on GPU `source` choosing `expert`.
    /// trtllm keeps per-source block counters: call in token order per source (as a rank would).
    int route(int source, int expert, int64_t local_token, int j, int top_k);
    /// Whether the pick depends only on (source, expert) (sglang-static, sglang-nearest, vllm-ascend).
    bool fixed_per_source() const;
    void reset();
    const SlotMap& slots() const { return slots_; }
    RoutingPolicy policy() const { return policy_; }

  private:
    SlotMap slots_;
    int num_experts_, num_gpus_;
    RoutingPolicy policy_;
    uint64_t seed_;
    std::vector<std::vector<int>> replicas_;  // [E]: the expert's slots, ascending
    std::vector<int> fixed_;                  // [G*E] slot, fixed-per-source policies
    // trtllm: per source, the current 1024-selection block and the selections of each expert in it so far.
    std::vector<int64_t> block_;
    std::vector<int> block_count_;  // [G*E]
};

/// The routers of every layer of a model under `policy`, built in layer order (SGLang's static tables share one
/// random stream across layers, so layer l's table depends on layers 0..l-1). Throws kInvalidArgument if
/// `policy` is not an engine policy.
std::vector<std::unique_ptr<EngineLayerRouter>> make_engine_routers(const std::vector<SlotMap>& layers, int num_experts,
                                                                    const Topology& topology, RoutingPolicy policy,
                                                                    uint64_t seed);

}  // namespace grace
