#include "grace/experts.hpp"

#include <Eigen/Core>
#include <array>
#include <cmath>

#include "core/rng.hpp"
#include "grace/error.hpp"

namespace grace {

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMat>;
using MutMap = Eigen::Map<RowMat>;

const std::vector<ExpertPreset>& presets() {
    // Shapes of spec §10; first_moe_layer is where MoE layer 0 sits in the Hugging Face checkpoint.
    static const std::vector<ExpertPreset> kPresets = {
        {"olmoe", {2048, 1024}, 64, 0},
        {"deepseek-v2-lite", {2048, 1408}, 64, 1},
        {"qwen3-30b-a3b", {2048, 768}, 128, 0},
        {"mixtral", {4096, 14336}, 8, 0},
    };
    return kPresets;
}

}  // namespace

const ExpertPreset& find_expert_preset(const std::string& name) {
    std::string known;
    for (const auto& p : presets()) {
        if (p.name == name) return p;
        known += (known.empty() ? "" : ", ") + p.name;
    }
    throw Error(ErrorCode::kInvalidArgument, cat("unknown preset '", name, "' (known: ", known, ")"));
}

size_t ExpertWeights::num_bytes() const {
    return (gate.size() + up.size() + down.size()) * 4 + (gate_bf16.size() + up_bf16.size() + down_bf16.size()) * 2;
}

std::string expert_tensor_name(int layer, int expert, const std::string& which) {
    return cat("model.layers.", layer, ".mlp.experts.", expert, ".", which, "_proj.weight");
}

ExpertWeights load_expert(const SafetensorsCheckpoint& checkpoint, int layer, int expert, DType storage,
                          ExpertShape expect) {
    GRACE_CHECK_ARG(storage == DType::kF32 || storage == DType::kBF16, "expert storage must be fp32 or bf16, not ",
                    to_string(storage));
    ExpertWeights w;
    w.expert = expert;
    w.storage = storage;
    std::array<const TensorInfo*, 3> infos{};
    const char* kWhich[3] = {"gate", "up", "down"};
    for (int i = 0; i < 3; ++i) {
        const std::string name = expert_tensor_name(layer, expert, kWhich[i]);
        infos[i] = checkpoint.find(name);
        GRACE_CHECK_INPUT(infos[i], "checkpoint ", checkpoint.path(), " has no tensor '", name, "' (expert ", expert,
                          " of layer ", layer, ")");
        GRACE_CHECK_INPUT(infos[i]->shape.size() == 2, "tensor '", name, "' has ", infos[i]->shape.size(),
                          " dimensions, expected 2");
    }
    const int64_t I = infos[0]->shape[0], H = infos[0]->shape[1];
    auto check_shape = [&](int i, int64_t rows, int64_t cols) {
        const auto& s = infos[i]->shape;
        GRACE_CHECK_INPUT(s[0] == rows && s[1] == cols, "tensor '", infos[i]->name, "' has shape [", s[0], ", ", s[1],
                          "], expected [", rows, ", ", cols, "]");
    };
    if (expect.hidden > 0) check_shape(0, expect.intermediate, expect.hidden);
    check_shape(1, I, H);
    check_shape(2, H, I);
    w.shape = {static_cast<int>(H), static_cast<int>(I)};
    if (storage == DType::kF32) {
        w.gate = checkpoint.read_f32(infos[0]->name);
        w.up = checkpoint.read_f32(infos[1]->name);
        w.down = checkpoint.read_f32(infos[2]->name);
    } else {
        w.gate_bf16 = checkpoint.read_bf16(infos[0]->name);
        w.up_bf16 = checkpoint.read_bf16(infos[1]->name);
        w.down_bf16 = checkpoint.read_bf16(infos[2]->name);
    }
    return w;
}

ExpertWeights random_expert(uint64_t seed, int layer, int expert, ExpertShape shape, DType storage) {
    GRACE_CHECK_ARG(shape.hidden > 0 && shape.intermediate > 0, "expert shape must be positive, got H=", shape.hidden,
                    " I=", shape.intermediate);
    GRACE_CHECK_ARG(storage == DType::kF32 || storage == DType::kBF16, "expert storage must be fp32 or bf16, not ",
                    to_string(storage));
    ExpertWeights w;
    w.expert = expert;
    w.shape = shape;
    w.storage = storage;
    const size_t n = static_cast<size_t>(shape.hidden) * shape.intermediate;
    auto fill = [&](int which, double fan_in, std::vector<float>& f32, std::vector<uint16_t>& b16) {
        const uint64_t key =
            (static_cast<uint64_t>(layer) << 40) ^ (static_cast<uint64_t>(expert) << 8) ^ static_cast<uint64_t>(which);
        const double bound = 1.0 / std::sqrt(fan_in);
        if (storage == DType::kF32)
            f32.resize(n);
        else
            b16.resize(n);
        for (size_t i = 0; i < n; ++i) {
            const float v = static_cast<float>((2.0 * to_unit(mix64(seed, key, i)) - 1.0) * bound);
            if (storage == DType::kF32)
                f32[i] = v;
            else
                b16[i] = float_to_bf16(v);
        }
    };
    fill(0, shape.hidden, w.gate, w.gate_bf16);
    fill(1, shape.hidden, w.up, w.up_bf16);
    fill(2, shape.intermediate, w.down, w.down_bf16);
    return w;
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

void expert_forward(const ExpertWeights& weights, const float* x, int64_t n, float* y, ExpertWorkspace& ws) {
    if (n == 0) return;
    const int H = weights.shape.hidden, I = weights.shape.intermediate;
    const size_t hi = static_cast<size_t>(H) * I;
    ExpertWeightsView view{weights.shape, nullptr, nullptr, nullptr};
    if (weights.storage == DType::kF32) {
        view.gate = weights.gate.data();
        view.up = weights.up.data();
        view.down = weights.down.data();
    } else {
        // bf16 storage: widen to fp32 per call (the stored copy stays bf16), then fp32 GEMMs.
        ws.weights.resize(3 * hi);
        float* dst = ws.weights.data();
        for (size_t i = 0; i < hi; ++i) dst[i] = bf16_to_float(weights.gate_bf16[i]);
        for (size_t i = 0; i < hi; ++i) dst[hi + i] = bf16_to_float(weights.up_bf16[i]);
        for (size_t i = 0; i < hi; ++i) dst[2 * hi + i] = bf16_to_float(weights.down_bf16[i]);
        view.gate = dst;
        view.up = dst + hi;
        view.down = dst + 2 * hi;
    }
    expert_forward(view, x, n, y, ws);
}

void expert_forward(const ExpertWeightsView& weights, const float* x, int64_t n, float* y, ExpertWorkspace& ws) {
    if (n == 0) return;
    const int H = weights.shape.hidden, I = weights.shape.intermediate;
    ws.gate_up.resize(static_cast<size_t>(n) * 2 * I);
    ws.act.resize(static_cast<size_t>(n) * I);
    ConstMap X(x, n, H), Wg(weights.gate, I, H), Wu(weights.up, I, H), Wd(weights.down, H, I);
    MutMap G(ws.gate_up.data(), n, I), U(ws.gate_up.data() + static_cast<size_t>(n) * I, n, I);
    MutMap A(ws.act.data(), n, I), Y(y, n, H);
    G.noalias() = X * Wg.transpose();
    U.noalias() = X * Wu.transpose();
    const size_t m = static_cast<size_t>(n) * I;
    const float* g = ws.gate_up.data();
    const float* u = g + m;
    for (size_t i = 0; i < m; ++i) ws.act[i] = silu(g[i]) * u[i];
    Y.noalias() = A * Wd.transpose();
}

void expert_forward_reference(const ExpertWeights& weights, const float* x, int64_t n, float* y) {
    const int H = weights.shape.hidden, I = weights.shape.intermediate;
    auto at = [&](const std::vector<float>& f, const std::vector<uint16_t>& b, size_t i) {
        return weights.storage == DType::kF32 ? f[i] : bf16_to_float(b[i]);
    };
    std::vector<float> act(I);
    for (int64_t r = 0; r < n; ++r) {
        const float* xr = x + r * H;
        for (int i = 0; i < I; ++i) {
            float g = 0, u = 0;
            for (int h = 0; h < H; ++h) {
                const size_t idx = static_cast<size_t>(i) * H + h;
                g += at(weights.gate, weights.gate_bf16, idx) * xr[h];
                u += at(weights.up, weights.up_bf16, idx) * xr[h];
            }
            act[i] = silu(g) * u;
        }
        for (int h = 0; h < H; ++h) {
            float s = 0;
            for (int i = 0; i < I; ++i)
                s += at(weights.down, weights.down_bf16, static_cast<size_t>(h) * I + i) * act[i];
            y[r * H + h] = s;
        }
    }
}

}  // namespace grace

namespace grace {
void set_expert_threads(int num_threads) {
    GRACE_CHECK_ARG(num_threads >= 1, "thread count must be >= 1, got ", num_threads);
    Eigen::setNbThreads(num_threads);
}
}  // namespace grace
