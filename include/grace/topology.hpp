#pragma once
/// @file topology.hpp
/// The cluster shape: N nodes x M GPUs per node, optionally S expert slots per GPU (spec §1).

#include <cstdint>
#include <optional>
#include <string>

namespace grace {

/// Most GPUs a topology may have (N * M). Ids are int, so the real bound is what per-GPU tables cost: a plan
/// holds G lists per layer, source loads are [L, G, E] and routing tables [G, E, period]. 65536 is far above
/// today's largest expert-parallel deployments and keeps N * M, G * E and G * slots inside int64 arithmetic.
inline constexpr int kMaxGpus = 65536;

/// `N x M` GPUs; GPU g is on node g / M with local index g % M. Slots are contiguous per GPU.
struct Topology {
    int nodes = 1;                     ///< N >= 1
    int gpus_per_node = 1;             ///< M >= 1
    std::optional<int> slots_per_gpu;  ///< S: max expert instances per GPU; unset = unlimited

    /// G = N * M.
    int num_gpus() const { return nodes * gpus_per_node; }
    /// Node of GPU g.
    int node_of(int gpu) const { return gpu / gpus_per_node; }
    /// Local index of GPU g inside its node.
    int local_index(int gpu) const { return gpu % gpus_per_node; }
    /// The GPU with local index `local` on node `node`.
    int gpu_at(int node, int local) const { return node * gpus_per_node + local; }
    /// "NxM" (and ":S" when slots are set).
    std::string to_string() const;

    /// Parses "NxM" (e.g. "2x4"). Throws kInvalidArgument for a malformed string, a zero part or more than
    /// kMaxGpus GPUs.
    static Topology parse(const std::string& text);
    /// Throws kInvalidArgument unless nodes, gpus_per_node (and slots, if set) are >= 1 and N * M <= kMaxGpus.
    void validate() const;

    bool operator==(const Topology&) const = default;
};

/// Data-parallel home GPU of token t of T tokens on G GPUs: floor(t * G / T) (contiguous blocks, spec §1).
inline int home_gpu(int64_t token, int64_t num_tokens, int num_gpus) {
    return static_cast<int>((static_cast<__int128>(token) * num_gpus) / num_tokens);
}

}  // namespace grace
