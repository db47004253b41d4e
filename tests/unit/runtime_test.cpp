// Runtime pieces that need no MPI: safetensors reader, bf16/f16 conversion, SwiGLU against a hand computation,
// checkpoint loading errors, the dispatch layout, the communicator factory, and the MoE layer on one local rank.
#include "grace/runtime.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "grace/communicator.hpp"
#include "grace/error.hpp"
#include "grace/experts.hpp"
#include "grace/safetensors.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

using testing::TempDir;
using testing::write_bytes;

// A safetensors file assembled by hand (independent of write_safetensors).
std::string raw_safetensors(const std::string& header, const std::string& data) {
    std::string h = header;
    while (h.size() % 8) h += ' ';
    std::string out(8, '\0');
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
    return out + h + data;
}

template <typename T>
std::string bytes_of(std::initializer_list<T> values) {
    std::string s(values.size() * sizeof(T), '\0');
    std::memcpy(s.data(), std::data(values), s.size());
    return s;
}

TEST(Bf16, RoundsToNearestEven) {
    EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
    EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
    // 1 + 2^-8 is halfway between 0x3F80 and 0x3F81: ties go to the even 0x3F80.
    EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3F80);
    // 1 + 3*2^-8 is halfway between 0x3F81 and 0x3F82: ties go to the even 0x3F82.
    EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);
    EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-12f), 0x3F81);  // above halfway rounds up
    EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
    EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
    for (float v : {0.0f, 1.5f, -0.15625f, 65536.0f}) EXPECT_EQ(bf16_to_float(float_to_bf16(v)), v);
}

TEST(F16, DecodesNormalSubnormalAndSpecial) {
    EXPECT_EQ(f16_to_float(0x3C00), 1.0f);
    EXPECT_EQ(f16_to_float(0xC000), -2.0f);
    EXPECT_EQ(f16_to_float(0x7BFF), 65504.0f);
    EXPECT_EQ(f16_to_float(0x0001), 0x1p-24f);
    EXPECT_EQ(f16_to_float(0x0400), 0x1p-14f);
    EXPECT_TRUE(std::isinf(f16_to_float(0x7C00)));
}

TEST(Safetensors, ReadsF32Bf16F16FromAHandWrittenFile) {
    TempDir dir;
    const std::string data = bytes_of<float>({1.0f, -2.5f, 3.0f, 0.25f, 5.0f, 6.0f}) +
                             bytes_of<uint16_t>({0x3F80, 0xC020}) + bytes_of<uint16_t>({0x3C00, 0x3800, 0xC400});
    const std::string header =
        R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
        R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[24,28]},"c":{"dtype":"F16","shape":[3],"data_offsets":[28,34]}})";
    write_bytes(dir.file("m.safetensors"), raw_safetensors(header, data));
    SafetensorsCheckpoint ck(dir.file("m.safetensors"));
    ASSERT_EQ(ck.tensors().size(), 3u);
    EXPECT_EQ(ck.find("a")->shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(ck.read_f32("a"), (std::vector<float>{1.0f, -2.5f, 3.0f, 0.25f, 5.0f, 6.0f}));
    EXPECT_EQ(ck.read_f32("b"), (std::vector<float>{1.0f, -2.5f}));
    EXPECT_EQ(ck.read_bf16("b"), (std::vector<uint16_t>{0x3F80, 0xC020}));
    EXPECT_EQ(ck.read_f32("c"), (std::vector<float>{1.0f, 0.5f, -4.0f}));
    EXPECT_EQ(ck.read_bf16("a")[1], float_to_bf16(-2.5f));
    EXPECT_EQ(ck.find("missing"), nullptr);
    try {
        ck.read_f32("missing");
        FAIL();
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("'missing'"), std::string::npos);
    }
}

TEST(Safetensors, RejectsMalformedFiles) {
    TempDir dir;
    auto expect_input_error = [&](const std::string& bytes, const std::string& needle) {
        write_bytes(dir.file("bad.safetensors"), bytes);
        try {
            SafetensorsCheckpoint ck(dir.file("bad.safetensors"));
            ADD_FAILURE() << "accepted: " << needle;
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::kInvalidInput);
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    expect_input_error("abc", "too short");
    expect_input_error(std::string("\xff\xff\xff\x00\x00\x00\x00\x00", 8) + "{}", "header length");
    expect_input_error(raw_safetensors("{not json", ""), "not valid JSON");
    expect_input_error(
        raw_safetensors(R"({"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')),
        "unsupported dtype 'I64'");
    expect_input_error(
        raw_safetensors(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')),
        "shape and dtype need 12");
    expect_input_error(
        raw_safetensors(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, '\0')),
        "exceed the data section");
}

TEST(Safetensors, WriterRoundTripsAndShardedFolderIsIndexed) {
    TempDir dir;
    write_safetensors(dir.file("s1.safetensors"), {{"w1", make_tensor(DType::kF32, {2}, {1.5f, -1.0f})}});
    write_safetensors(dir.file("s2.safetensors"), {{"w2", make_tensor(DType::kBF16, {1, 2}, {3.0f, 0.5f})}});
    testing::write_bytes(dir.file("model.safetensors.index.json"),
                         R"({"metadata":{},"weight_map":{"w1":"s1.safetensors","w2":"s2.safetensors"}})");
    SafetensorsCheckpoint ck(dir.path().string());
    EXPECT_EQ(ck.read_f32("w1"), (std::vector<float>{1.5f, -1.0f}));
    EXPECT_EQ(ck.read_f32("w2"), (std::vector<float>{3.0f, 0.5f}));
    EXPECT_EQ(ck.find("w2")->dtype, DType::kBF16);
}

// gate = [[1, 2]], up = [[0.5, -1]], down = [[2], [-3]], x = [1, 1]:
// g = 3, u = -0.5, silu(3) = 3 / (1 + e^-3) = 2.8577223804673, a = -1.42886119023, y = [2a, -3a].
ExpertWeights hand_expert(DType storage) {
    ExpertWeights w;
    w.expert = 0;
    w.shape = {2, 1};
    w.storage = storage;
    std::vector<float> gate{1, 2}, up{0.5f, -1}, down{2, -3};
    if (storage == DType::kF32) {
        w.gate = gate, w.up = up, w.down = down;
    } else {
        for (float v : gate) w.gate_bf16.push_back(float_to_bf16(v));
        for (float v : up) w.up_bf16.push_back(float_to_bf16(v));
        for (float v : down) w.down_bf16.push_back(float_to_bf16(v));
    }
    return w;
}

TEST(SwiGlu, MatchesAHandComputation) {
    const double a = 3.0 / (1.0 + std::exp(-3.0)) * -0.5;
    const float x[4] = {1, 1, 0, 0};  // two rows; the second gives zero
    for (DType storage : {DType::kF32, DType::kBF16}) {
        ExpertWeights w = hand_expert(storage);
        ExpertWorkspace ws;
        float y[4], r[4];
        expert_forward(w, x, 2, y, ws);
        expert_forward_reference(w, x, 2, r);
        EXPECT_NEAR(y[0], 2 * a, 1e-6);
        EXPECT_NEAR(y[1], -3 * a, 1e-6);
        EXPECT_EQ(y[2], 0.0f);
        EXPECT_EQ(y[3], 0.0f);
        for (int i = 0; i < 4; ++i) EXPECT_NEAR(r[i], y[i], 1e-6);
    }
    EXPECT_NEAR(silu(3.0f), 2.8577223804673, 1e-6);
}

TEST(SwiGlu, EigenPathAgreesWithLoopsAtAModelShapeFraction) {
    const ExpertShape shape{64, 48};
    for (DType storage : {DType::kF32, DType::kBF16}) {
        ExpertWeights w = random_expert(7, 1, 3, shape, storage);
        std::vector<float> x(5 * 64), y(5 * 64), r(5 * 64);
        for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
        ExpertWorkspace ws;
        expert_forward(w, x.data(), 5, y.data(), ws);
        expert_forward_reference(w, x.data(), 5, r.data());
        for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], r[i], 1e-5 * (1 + std::fabs(r[i])));
    }
}

TEST(Experts, RandomInitIsAPureFunctionOfSeedLayerExpert) {
    const ExpertShape shape{8, 4};
    const auto a = random_expert(1, 2, 3, shape, DType::kF32), b = random_expert(1, 2, 3, shape, DType::kF32);
    EXPECT_EQ(a.gate, b.gate);
    EXPECT_EQ(a.down, b.down);
    EXPECT_NE(a.gate, random_expert(1, 2, 4, shape, DType::kF32).gate);
    EXPECT_NE(a.gate, random_expert(1, 3, 3, shape, DType::kF32).gate);
    EXPECT_NE(a.gate, a.up);
    const auto c = random_expert(1, 2, 3, shape, DType::kBF16);
    for (size_t i = 0; i < a.gate.size(); ++i) EXPECT_EQ(c.gate_bf16[i], float_to_bf16(a.gate[i]));
    for (float v : a.gate) EXPECT_LT(std::fabs(v), 1 / std::sqrt(8.0f));
}

TEST(Experts, LoadsOlmoeNamesAndNamesMissingOrMisshapenTensors) {
    TempDir dir;
    std::map<std::string, TensorData> t;
    const std::vector<float> g{1, 2, 3, 4, 5, 6}, d{1, 2, 3, 4, 5, 6};
    t["model.layers.1.mlp.experts.0.gate_proj.weight"] = make_tensor(DType::kF32, {2, 3}, g);
    t["model.layers.1.mlp.experts.0.up_proj.weight"] = make_tensor(DType::kF32, {2, 3}, g);
    t["model.layers.1.mlp.experts.0.down_proj.weight"] = make_tensor(DType::kBF16, {3, 2}, d);
    t["model.layers.1.mlp.experts.1.gate_proj.weight"] = make_tensor(DType::kF32, {2, 3}, g);
    t["model.layers.1.mlp.experts.1.up_proj.weight"] = make_tensor(DType::kF32, {2, 3}, g);
    t["model.layers.1.mlp.experts.1.down_proj.weight"] = make_tensor(DType::kF32, {2, 3}, g);  // wrong: [H, I] = [3, 2]
    write_safetensors(dir.file("m.safetensors"), t);
    SafetensorsCheckpoint ck(dir.file("m.safetensors"));
    ExpertWeights w = load_expert(ck, 1, 0, DType::kF32);
    EXPECT_EQ(w.shape, (ExpertShape{3, 2}));
    EXPECT_EQ(w.gate, g);
    EXPECT_EQ(w.down, d);
    EXPECT_EQ(load_expert(ck, 1, 0, DType::kBF16).down_bf16[5], float_to_bf16(6.0f));
    auto message = [&](int layer, int expert, ExpertShape expect) {
        try {
            load_expert(ck, layer, expert, DType::kF32, expect);
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::kInvalidInput);
            return std::string(e.what());
        }
        return std::string("no error");
    };
    EXPECT_NE(message(1, 2, {}).find("'model.layers.1.mlp.experts.2.gate_proj.weight' (expert 2 of layer 1)"),
              std::string::npos);
    EXPECT_NE(
        message(1, 1, {}).find("'model.layers.1.mlp.experts.1.down_proj.weight' has shape [2, 3], expected [3, 2]"),
        std::string::npos);
    EXPECT_NE(message(1, 0, {4, 2}).find("expected [2, 4]"), std::string::npos);
    EXPECT_EQ(find_expert_preset("deepseek-v2-lite").first_moe_layer, 1);
    EXPECT_EQ(find_expert_preset("olmoe").shape, (ExpertShape{2048, 1024}));
    EXPECT_THROW(find_expert_preset("gpt5"), Error);
}

TEST(DispatchLayout, CountsTokensPerRankAndNodeDeduplicated) {
    // 2 x 2 topology; 3 tokens, k = 3. dest: t0 -> {0, 1, 1}, t1 -> {2, 3, 0}, t2 -> {3, 3, 3}.
    const Topology topo{2, 2};
    const int32_t dest[9] = {0, 1, 1, 2, 3, 0, 3, 3, 3};
    const int32_t ids[9] = {0, 1, 2, 3, 4, 5, 6, 7, 1};
    const DispatchLayout l = compute_dispatch_layout(dest, ids, 3, 3, 8, topo);
    EXPECT_EQ(l.num_tokens_per_rank, (std::vector<int>{2, 1, 1, 2}));
    EXPECT_EQ(l.num_tokens_per_node, (std::vector<int>{2, 2}));
    EXPECT_EQ(l.num_tokens_per_expert, (std::vector<int>{1, 2, 1, 1, 1, 1, 1, 1}));
    EXPECT_EQ(l.is_token_in_rank, (std::vector<uint8_t>{1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1}));
    const int32_t bad[3] = {0, 4, 1};
    EXPECT_THROW(compute_dispatch_layout(bad, ids, 1, 3, 8, topo), Error);
}

TEST(Communicator, BackendsAreChosenByNameAndMissingOnesAreUnsupported) {
    auto local = make_communicator("local", {Topology{1, 1}});
    EXPECT_EQ(local->backend(), "local");
    EXPECT_EQ(local->size(), 1);
    try {
        make_communicator("nccl", {Topology{1, 1}});
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    }
    EXPECT_THROW(make_communicator("carrier-pigeon", {Topology{1, 1}}), Error);
    EXPECT_THROW(make_communicator("local", {Topology{2, 1}}), Error);
    const std::vector<char> send{'a', 'b', 'c'};
    std::vector<char> recv(2);
    AlltoallvLayout lay{{2}, {1}, {2}, {0}};
    local->alltoallv(CommGroup::kGlobal, send.data(), recv.data(), lay);
    EXPECT_EQ(recv, (std::vector<char>{'b', 'c'}));
}

TEST(Communicator, TimeoutMustBeFiniteAndNonNegativeAndAllgatherBytesCopies) {
    for (double bad : {-1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
        try {
            make_communicator("local", {Topology{1, 1}, bad});
            FAIL() << bad;
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
            EXPECT_NE(std::string(e.what()).find("timeout"), std::string::npos) << e.what();
        }
    }
    auto local = make_communicator("local", {Topology{1, 1}, 2.5});
    EXPECT_EQ(local->timeout_s(), 2.5);
    const std::vector<uint8_t> data{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    EXPECT_EQ(local->allgather_bytes(data.data(), data.size()), data);
    // The interface's default (8 bytes per allgather) on a size that is not a multiple of 8.
    EXPECT_EQ(local->Communicator::allgather_bytes(data.data(), data.size()), data);
}

TEST(MoeLayer, OneLocalRankEqualsTheDenseSumAndSendsNothing) {
    auto comm = make_communicator("local", {Topology{1, 1}});
    LayerPlan lp;
    lp.gpu_experts = {{0, 1, 2, 3}};
    lp.primary_gpu = {0, 0, 0, 0};
    lp.finalize(4);
    std::vector<ExpertWeights> experts;
    for (int e = 0; e < 4; ++e) experts.push_back(random_expert(3, 0, e, {8, 6}, DType::kF32));
    const std::vector<ExpertWeights> copy = experts;
    for (CommScheme scheme : {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::kHsc}) {
        MoeLayer layer(lp, Topology{1, 1}, *comm, copy, {scheme, RoutingPolicy::kWrr});
        std::vector<float> x(3 * 8);
        for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.5f * static_cast<float>(i));
        const std::vector<int32_t> ids{0, 3, 2, 1, 3, -1};
        const std::vector<float> w{0.7f, 0.3f, 0.5f, 0.5f, 1.0f, 9.0f};
        const auto out = layer.forward(x, ids, w, 2);
        for (int t = 0; t < 3; ++t) {
            std::vector<float> ref(8, 0.0f), y(8);
            for (int j = 0; j < 2; ++j) {
                if (ids[t * 2 + j] < 0) continue;
                expert_forward_reference(experts[ids[t * 2 + j]], x.data() + t * 8, 1, y.data());
                for (int h = 0; h < 8; ++h) ref[h] += w[t * 2 + j] * y[h];
            }
            for (int h = 0; h < 8; ++h) EXPECT_NEAR(out[t * 8 + h], ref[h], 1e-6);
        }
        const auto& st = layer.last_stats();
        EXPECT_EQ(st.dispatch[0].payload + st.dispatch[1].payload + st.combine[0].payload, 0);
        EXPECT_EQ(st.expert_rows, 5);
        EXPECT_EQ(layer.last_layout().num_tokens_per_rank, (std::vector<int>{3}));
    }
    // The plan puts 4 experts on rank 0: giving 3 is an error naming the missing one.
    std::vector<ExpertWeights> three(copy.begin(), copy.begin() + 3);
    try {
        MoeLayer layer(lp, Topology{1, 1}, *comm, three);
        FAIL();
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("expert 3"), std::string::npos) << e.what();
    }
}

// forward() is dispatch -> experts -> combine: on one rank every selection is served locally; the received rows
// are the tokens with a selection (local slot = index into the given experts), and the caller's own weights
// (ExpertWeightsView) on a weightless layer give the same bits.
TEST(MoeLayer, PhasesEqualForwardBitForBitAndNameBadHandlesAndSlots) {
    auto comm = make_communicator("local", {Topology{1, 1}});
    LayerPlan lp;
    lp.gpu_experts = {{2, 0, 3, 1}};  // slot s holds expert gpu_experts[0][s] (after finalize)
    lp.primary_gpu = {0, 0, 0, 0};
    lp.finalize(4);
    std::vector<ExpertWeights> experts;
    for (int e : lp.gpu_experts[0]) experts.push_back(random_expert(3, 0, e, {8, 6}, DType::kBF16));
    std::vector<float> x(3 * 8);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.3f * static_cast<float>(i));
    const std::vector<int32_t> ids{0, 3, -1, -1, 2, 0};
    const std::vector<float> w{0.7f, 0.3f, 9.0f, 9.0f, 0.5f, 0.5f};
    // fp32 copies of the bf16 weights, stacked as the Python API passes them: w13 [S, 2I, H], w2 [S, H, I].
    std::vector<float> w13, w2;
    for (const ExpertWeights& e : experts) {
        for (uint16_t b : e.gate_bf16) w13.push_back(bf16_to_float(b));
        for (uint16_t b : e.up_bf16) w13.push_back(bf16_to_float(b));
        for (uint16_t b : e.down_bf16) w2.push_back(bf16_to_float(b));
    }
    std::vector<ExpertWeightsView> views;
    for (int s = 0; s < 4; ++s)
        views.push_back({{8, 6}, w13.data() + s * 96, w13.data() + s * 96 + 48, w2.data() + s * 48});
    for (CommScheme scheme : {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::kHsc}) {
        MoeLayer layer(lp, Topology{1, 1}, *comm, experts, {scheme, RoutingPolicy::kWrr});
        MoeLayer bare(lp, Topology{1, 1}, *comm, 8, {scheme, RoutingPolicy::kWrr});
        EXPECT_EQ(bare.num_local_experts(), 4);
        const std::vector<float> ref = layer.forward(x, ids, w, 2);
        MoeReceived rec;
        MoeHandle handle = bare.dispatch(x.data(), ids.data(), w.data(), 3, 2, rec);
        EXPECT_EQ(handle.num_tokens(), 3);
        ASSERT_EQ(rec.rows, 2);  // token 1 has no selection
        EXPECT_EQ(handle.num_rows(), 2);
        std::vector<int32_t> served;  // slot -> expert through the plan's list of this rank
        for (int32_t slot : rec.topk) served.push_back(lp.gpu_experts[0].at(slot));
        EXPECT_EQ(served, (std::vector<int32_t>{0, 3, 2, 0}));
        EXPECT_EQ(rec.weights, (std::vector<float>{0.7f, 0.3f, 0.5f, 0.5f}));
        EXPECT_TRUE(std::equal(rec.x.begin(), rec.x.begin() + 8, x.begin()));
        EXPECT_TRUE(std::equal(rec.x.begin() + 8, rec.x.end(), x.begin() + 16));
        std::vector<float> expert_out(2 * 8), out(3 * 8, -1.0f);
        bare.experts(views, rec.x.data(), rec.topk.data(), rec.weights.data(), rec.rows, 2, expert_out.data());
        EXPECT_EQ(bare.last_stats().expert_rows, 4);
        bare.combine(expert_out.data(), handle, out.data());
        EXPECT_EQ(std::memcmp(out.data(), ref.data(), ref.size() * 4), 0) << to_string(scheme);
        EXPECT_FALSE(handle.valid());
        try {
            bare.combine(expert_out.data(), handle, out.data());
            FAIL();
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("already combined"), std::string::npos) << e.what();
        }
        // The layer with its own weights, in phases.
        MoeHandle h2 = layer.dispatch(x.data(), ids.data(), w.data(), 3, 2, rec);
        layer.experts(rec, expert_out.data());
        try {
            bare.combine(expert_out.data(), h2, out.data());
            FAIL();
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("another layer"), std::string::npos) << e.what();
        }
        layer.combine(expert_out.data(), h2, out.data());
        // The router's counters moved on by one call: compare with a second forward on a fresh layer pair.
        MoeLayer again(lp, Topology{1, 1}, *comm, experts, {scheme, RoutingPolicy::kWrr});
        again.forward(x, ids, w, 2);
        EXPECT_EQ(std::memcmp(out.data(), again.forward(x, ids, w, 2).data(), out.size() * 4), 0);
    }
    MoeLayer bare(lp, Topology{1, 1}, *comm, 8);
    MoeReceived rec;
    MoeHandle handle = bare.dispatch(x.data(), ids.data(), w.data(), 3, 2, rec);
    rec.topk[1] = 4;
    std::vector<float> expert_out(2 * 8);
    try {
        bare.experts(views, rec.x.data(), rec.topk.data(), rec.weights.data(), rec.rows, 2, expert_out.data());
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()), "recv_topk[0, 1] = 4 is outside [-1, 4) (4 local experts; -1 = none)");
    }
    try {
        bare.experts(rec, expert_out.data());
        FAIL();
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("without expert weights"), std::string::npos) << e.what();
    }
    try {
        bare.forward(x, ids, w, 2);
        FAIL();
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("without expert weights"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace grace
