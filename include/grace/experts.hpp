#pragma once
/// @file experts.hpp
/// Expert weights and the SwiGLU expert computation: y = down(silu(gate(x)) * up(x)), with the Hugging Face
/// layout (gate_proj and up_proj weights [I, H], down_proj weight [H, I], y = x W^T). Weights are stored in
/// fp32 or bf16; bf16 is converted to fp32 for the GEMMs, which accumulate in fp32 (Eigen).
///
/// Weights come from a safetensors checkpoint with the tensor names of OLMoE, Qwen3-MoE and DeepSeek-V2
/// (`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`), or from a seeded counter-based random init:
/// element i of tensor (layer, expert, which) is a pure function of (seed, layer, expert, which, i), so every
/// replica of an expert holds identical weights on every rank.

#include <cstdint>
#include <string>
#include <vector>

#include "grace/safetensors.hpp"

namespace grace {

/// Shape of one expert.
struct ExpertShape {
    int hidden = 0;        ///< H
    int intermediate = 0;  ///< I
    bool operator==(const ExpertShape&) const = default;
};

/// Expert shape and checkpoint layout of a model preset.
struct ExpertPreset {
    std::string name;         ///< "olmoe", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral"
    ExpertShape shape;        ///< H, I
    int num_experts = 0;      ///< routed experts E
    int first_moe_layer = 0;  ///< checkpoint layer of MoE layer 0 (DeepSeek-V2: 1, its layer 0 is dense)
};

/// Looks up a preset (the shapes of spec §10); throws kInvalidArgument listing the known names.
const ExpertPreset& find_expert_preset(const std::string& name);

/// The weights of one expert.
struct ExpertWeights {
    int expert = -1;  ///< logical expert id
    ExpertShape shape;
    DType storage = DType::kF32;  ///< kF32 or kBF16
    /// fp32 storage: gate [I, H], up [I, H], down [H, I], row-major. Empty for bf16.
    std::vector<float> gate, up, down;
    /// bf16 storage (bits): same shapes. Empty for fp32.
    std::vector<uint16_t> gate_bf16, up_bf16, down_bf16;

    /// Bytes of weight storage.
    size_t num_bytes() const;
};

/// Name of a weight tensor in OLMoE / Qwen3-MoE / DeepSeek-V2 checkpoints:
/// `model.layers.{layer}.mlp.experts.{expert}.{which}_proj.weight`, which in {"gate", "up", "down"}.
std::string expert_tensor_name(int layer, int expert, const std::string& which);

/// Loads expert `expert` of checkpoint layer `layer`, stored as `storage`. Throws kInvalidInput naming the tensor
/// if one is missing, not 2-D, or its shape differs from gate/up [I, H], down [H, I] or from `expect` (when
/// expect.hidden > 0).
ExpertWeights load_expert(const SafetensorsCheckpoint& checkpoint, int layer, int expert, DType storage,
                          ExpertShape expect = {});

/// Seeded random init of expert `expert` of layer `layer`: uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)) from
/// mix64 counters, rounded to bf16 when storage is kBF16. Independent of rank and thread count.
ExpertWeights random_expert(uint64_t seed, int layer, int expert, ExpertShape shape, DType storage);

/// Reusable scratch for expert_forward (avoids reallocation per call).
struct ExpertWorkspace {
    std::vector<float> gate_up;  ///< [n, 2I]
    std::vector<float> act;      ///< [n, I]
    std::vector<float> weights;  ///< fp32 copy of bf16 weights, 3*H*I
};

/// Non-owning fp32 weights of one expert, e.g. the rows of a caller's stacked tensors w13 [S, 2I, H] (gate =
/// w13[s][0:I], up = w13[s][I:2I]) and w2 [S, H, I] (down = w2[s]). Row-major, same shapes as ExpertWeights.
struct ExpertWeightsView {
    ExpertShape shape;
    const float* gate = nullptr;  ///< [I, H]
    const float* up = nullptr;    ///< [I, H]
    const float* down = nullptr;  ///< [H, I]
};

/// y[n, H] = down(silu(gate(x)) * up(x)) for x[n, H], through Eigen GEMMs (fp32 accumulation). n may be 0.
void expert_forward(const ExpertWeights& weights, const float* x, int64_t n, float* y, ExpertWorkspace& workspace);
/// The same on fp32 weights the caller owns (bit-identical to the overload above on the same values; the
/// workspace's `weights` is not used).
void expert_forward(const ExpertWeightsView& weights, const float* x, int64_t n, float* y, ExpertWorkspace& workspace);

/// The same computation with plain loops (no BLAS; double accumulation is NOT used: fp32, natural order):
/// the independent reference that the runtime's outputs are checked against.
void expert_forward_reference(const ExpertWeights& weights, const float* x, int64_t n, float* y);

/// Threads Eigen may use inside one GEMM (default 1: under MPI the ranks are the parallelism, and one thread
/// keeps results independent of the thread count).
void set_expert_threads(int num_threads);

/// silu(v) = v / (1 + exp(-v)).
float silu(float v);

/// FLOPs of expert_forward on n rows: 2*n*H*I*3 (three GEMMs) (the element-wise part is not counted).
inline double expert_flops(ExpertShape shape, int64_t n) {
    return 6.0 * static_cast<double>(n) * shape.hidden * shape.intermediate;
}

}  // namespace grace
