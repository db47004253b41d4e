#include "grace/trace.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "grace/error.hpp"
#include "grace/npy.hpp"
#include "grace/topology.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

using testing::TempDir;
using testing::write_bytes;

RoutingTrace small_trace() {
    RoutingTrace t;
    t.num_tokens = 3;
    t.num_layers = 2;
    t.top_k = 2;
    t.num_experts = 4;
    t.model = "toy";
    t.dataset = "unit";
    t.expert_ids = {0, 1, 2, 3, /*t1*/ 1, 2, 0, 3, /*t2*/ 3, 0, 1, 2};
    t.gate_weights = {0.6f, 0.4f, 0.5f, 0.5f, 0.7f, 0.3f, 0.9f, 0.1f, 0.55f, 0.45f, 0.2f, 0.8f};
    return t;
}

using testing::error_of;

TEST(Trace, SaveLoadRoundTripWithMetadataAndWeights) {
    TempDir dir;
    RoutingTrace t = small_trace();
    save_trace(t, dir.file("trace.npy"));
    EXPECT_TRUE(std::filesystem::exists(dir.file("trace.json")));
    EXPECT_TRUE(std::filesystem::exists(dir.file("trace.weights.npy")));
    RoutingTrace u = load_trace(dir.file("trace.npy"));
    EXPECT_EQ(u.num_tokens, 3);
    EXPECT_EQ(u.num_layers, 2);
    EXPECT_EQ(u.top_k, 2);
    EXPECT_EQ(u.num_experts, 4);
    EXPECT_EQ(u.model, "toy");
    EXPECT_EQ(u.dataset, "unit");
    EXPECT_EQ(u.expert_ids, t.expert_ids);
    EXPECT_EQ(u.gate_weights, t.gate_weights);
    EXPECT_EQ(u.id(1, 1, 0), 0);
}

TEST(Trace, FlagsOverrideMetadataAndTwoDimensionalIsOneLayer) {
    TempDir dir;
    write_npy(dir.file("one.npy"), std::vector<int32_t>{0, 5, 7, 2}, {2, 2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("one.npy")); }).find("number of experts unknown"), std::string::npos);
    TraceOverrides o;
    o.num_experts = 8;
    o.model = "m";
    RoutingTrace t = load_trace(dir.file("one.npy"), o);
    EXPECT_EQ(t.num_layers, 1);
    EXPECT_EQ(t.top_k, 2);
    EXPECT_EQ(t.model, "m");
    EXPECT_EQ(t.id(1, 0, 1), 2);
}

TEST(Trace, RejectsBadIdsShapesAndWeights) {
    TempDir dir;
    TraceOverrides o;
    o.num_experts = 4;
    write_npy(dir.file("oor.npy"), std::vector<int32_t>{0, 4}, {1, 2});
    EXPECT_NE(
        error_of([&] { load_trace(dir.file("oor.npy"), o); }).find("expert id 4 at token 0, layer 0 is out of range"),
        std::string::npos);
    write_npy(dir.file("neg.npy"), std::vector<int32_t>{-1, 2}, {1, 2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("neg.npy"), o); }).find("out of range"), std::string::npos);
    write_npy(dir.file("rep.npy"), std::vector<int32_t>{1, 2, 3, 3}, {2, 2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("rep.npy"), o); }).find("repeated in the top-k of token 1"),
              std::string::npos);
    write_npy(dir.file("rank1.npy"), std::vector<int32_t>{1, 2}, {2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("rank1.npy"), o); }).find("rank 1"), std::string::npos);
    write_npy(dir.file("empty.npy"), std::vector<int32_t>{}, {0, 2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("empty.npy"), o); }).find("empty trace"), std::string::npos);
    write_npy(dir.file("bigk.npy"), std::vector<int32_t>{0, 1, 2, 3, 0}, {1, 5});
    EXPECT_NE(error_of([&] { load_trace(dir.file("bigk.npy"), o); }).find("exceeds the number of experts"),
              std::string::npos);
    write_npy(dir.file("flt.npy"), std::vector<float>{0.f, 1.f}, {1, 2});
    EXPECT_NE(error_of([&] { load_trace(dir.file("flt.npy"), o); }).find("must be integers"), std::string::npos);

    write_npy(dir.file("ok.npy"), std::vector<int32_t>{0, 1}, {1, 2});
    write_npy(dir.file("w_nan.npy"), std::vector<float>{0.5f, std::nanf("")}, {1, 2});
    TraceOverrides wo = o;
    wo.weights_path = dir.file("w_nan.npy");
    EXPECT_NE(error_of([&] { load_trace(dir.file("ok.npy"), wo); }).find("not finite"), std::string::npos);
    write_npy(dir.file("w_shape.npy"), std::vector<float>{0.5f, 0.5f, 0.1f}, {1, 3});
    wo.weights_path = dir.file("w_shape.npy");
    EXPECT_NE(error_of([&] { load_trace(dir.file("ok.npy"), wo); }).find("gate weights have shape [1, 3]"),
              std::string::npos);
}

TEST(TraceLimits, MetadataIntegersAreRangeChecked) {
    TempDir dir;
    write_npy(dir.file("t.npy"), std::vector<int32_t>{0, 1, 2, 3, 1, 2}, {3, 1, 2});
    const std::string meta = dir.file("t.json");
    auto error_with = [&](const std::string& json) {
        write_bytes(meta, json);
        return error_of([&] { load_trace(dir.file("t.npy")); });
    };
    // 2^32 + 16 used to be read as 16, 16.7 as 16.
    EXPECT_EQ(error_with(R"({"num_experts": 4294967312})"),
              meta + ": num_experts: 4294967312 is outside [1, 2147483647]");
    EXPECT_EQ(error_with(R"({"num_experts": 16.7})"), meta + ": num_experts: 16.7 is not an integer");
    EXPECT_EQ(error_with(R"({"num_experts": "16"})"), meta + ": num_experts: \"16\" is not an integer");
    EXPECT_EQ(error_with(R"({"num_experts": 16, "num_tokens": -3})"),
              meta + ": num_tokens: -3 is outside [0, 9223372036854775807]");
    EXPECT_EQ(error_with(R"({"num_experts": 16, "num_layers": 1, "top_k": 2, "num_tokens": 3})"), "");
}

TEST(TraceLimits, MetadataThatContradictsTheArrayIsAnError) {
    TempDir dir;
    write_npy(dir.file("t.npy"), std::vector<int32_t>{0, 1, 2, 3, 1, 2}, {3, 1, 2});
    const std::string meta = dir.file("t.json"), ids = dir.file("t.npy");
    auto error_with = [&](const std::string& json) {
        write_bytes(meta, json);
        return error_of([&] { load_trace(ids); });
    };
    EXPECT_EQ(error_with(R"({"num_experts": 8, "top_k": 4})"),
              meta + ": top_k = 4 contradicts " + ids + " of shape [3, 1, 2] (top_k = 2)");
    EXPECT_EQ(error_with(R"({"num_experts": 8, "num_layers": 2})"),
              meta + ": num_layers = 2 contradicts " + ids + " of shape [3, 1, 2] (layers = 1)");
    EXPECT_EQ(error_with(R"({"num_experts": 8, "num_tokens": 30})"),
              meta + ": num_tokens = 30 contradicts " + ids + " of shape [3, 1, 2] (tokens = 3)");
    // num_experts at or below the largest id: the id and its place are named.
    EXPECT_NE(error_with(R"({"num_experts": 3})").find("expert id 3 at token 1, layer 0 is out of range [0, 3)"),
              std::string::npos);
}

TEST(Trace, ValidateCatchesInMemoryMistakes) {
    RoutingTrace t = small_trace();
    t.gate_weights[3] = INFINITY;
    EXPECT_NE(error_of([&] { t.validate(); }).find("not finite"), std::string::npos);
    RoutingTrace e = small_trace();
    e.num_tokens = 0;
    e.expert_ids.clear();
    EXPECT_NE(error_of([&] { e.validate(); }).find("empty trace"), std::string::npos);
}

TEST(Trace, SaveToMissingFolderFailsWithoutPartialFiles) {
    TempDir dir;
    EXPECT_NE(error_of([&] { save_trace(small_trace(), dir.file("missing/t.npy")); }).find("does not exist"),
              std::string::npos);
    EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(Trace, ReaderStreamsChunksEqualToWholeLoad) {
    TempDir dir;
    RoutingTrace t;
    t.num_tokens = 101;
    t.num_layers = 3;
    t.top_k = 2;
    t.num_experts = 16;
    for (int64_t i = 0; i < t.num_tokens * t.num_layers; ++i) {
        t.expert_ids.push_back(static_cast<int32_t>(i % 16));
        t.expert_ids.push_back(static_cast<int32_t>((i * 7 + 3) % 16 == i % 16 ? (i + 1) % 16 : (i * 7 + 3) % 16));
    }
    save_trace(t, dir.file("s.npy"));
    TraceReader reader(dir.file("s.npy"));
    std::vector<int32_t> all;
    RoutingTrace chunk;
    int64_t first = -1, expected_first = 0;
    while (reader.next(17, chunk, &first)) {
        EXPECT_EQ(first, expected_first);
        expected_first += chunk.num_tokens;
        all.insert(all.end(), chunk.expert_ids.begin(), chunk.expert_ids.end());
    }
    EXPECT_EQ(all, t.expert_ids);
    EXPECT_EQ(t.slice_tokens(10, 20).expert_ids,
              std::vector<int32_t>(t.expert_ids.begin() + 60, t.expert_ids.begin() + 120));
}

// A trace of T tokens, L = 3, k = 2, E = 16 with distinct ids and weights w[t, l, j] = (t + l + j) / 1000.
RoutingTrace weighted_trace(int64_t tokens) {
    RoutingTrace t;
    t.num_tokens = tokens;
    t.num_layers = 3;
    t.top_k = 2;
    t.num_experts = 16;
    for (int64_t i = 0; i < tokens; ++i)
        for (int l = 0; l < 3; ++l)
            for (int j = 0; j < 2; ++j) {
                t.expert_ids.push_back(static_cast<int32_t>((i + l + 5 * j) % 16));
                t.gate_weights.push_back(static_cast<float>(i + l + j) / 1000.f);
            }
    return t;
}

TEST(GateWeights, ValidateNamesTheFirstBadValue) {
    const std::vector<float> ok = {0.f, -0.f, 1.f, 0.25f, 1e30f, 0.5f};
    EXPECT_NO_THROW(validate_gate_weights(ok.data(), 1, 3, 2, 0, "w"));
    std::vector<float> bad = ok;
    bad[5] = std::nanf("");
    bad[3] = -1e-7f;
    // Token numbers count from first_token; layer and rank locate the value in the row.
    EXPECT_EQ(error_of([&] { validate_gate_weights(bad.data(), 1, 3, 2, 40, "w.npy"); }),
              "w.npy: gate weight -1e-07 at token 40, layer 1, rank 1 is negative");
    bad[3] = INFINITY;
    EXPECT_EQ(error_of([&] { validate_gate_weights(bad.data(), 1, 3, 2, 0, "w.npy"); }),
              "w.npy: gate weight inf at token 0, layer 1, rank 1 is not finite");
    // Large enough for the parallel scan: still the first bad value in order, whatever the threads found first.
    const int64_t tokens = 600000;
    std::vector<float> big(static_cast<size_t>(tokens) * 2 * 4, 0.125f);
    big[(150000 * 2 + 1) * 4 + 2] = std::nanf("");
    big[(580000 * 2 + 0) * 4 + 0] = -1.f;
    EXPECT_EQ(error_of([&] { validate_gate_weights(big.data(), tokens, 2, 4, 0, "big"); }),
              "big: gate weight nan at token 150000, layer 1, rank 2 is not finite");
}

TEST(GateWeights, ReaderStreamsThemWithTheIds) {
    TempDir dir;
    const RoutingTrace t = weighted_trace(101);
    save_trace(t, dir.file("w.npy"));
    TraceReader reader(dir.file("w.npy"));
    EXPECT_TRUE(reader.has_weights());
    EXPECT_EQ(reader.weights_path(), dir.file("w.weights.npy"));
    RoutingTrace chunk;
    ASSERT_TRUE(reader.next(17, chunk));
    EXPECT_TRUE(chunk.gate_weights.empty());  // read and checked, not kept unless asked for
    std::vector<float> all;
    reader.set_keep_weights(true);
    while (reader.next(17, chunk)) {
        ASSERT_EQ(chunk.gate_weights.size(), chunk.expert_ids.size());
        all.insert(all.end(), chunk.gate_weights.begin(), chunk.gate_weights.end());
    }
    EXPECT_EQ(all, std::vector<float>(t.gate_weights.begin() + 17 * 6, t.gate_weights.end()));
    // float64 weights are read as well (float16 and float32 take the same path).
    write_npy(dir.file("w64.npy"), std::vector<double>(t.gate_weights.begin(), t.gate_weights.end()), {101, 3, 2});
    TraceOverrides o;
    o.weights_path = dir.file("w64.npy");
    EXPECT_EQ(load_trace(dir.file("w.npy"), o).gate_weights, t.gate_weights);
    // Without weights the chunks carry none.
    RoutingTrace bare = t;
    bare.gate_weights.clear();
    save_trace(bare, dir.file("bare.npy"));
    TraceReader plain(dir.file("bare.npy"));
    plain.set_keep_weights(true);
    EXPECT_FALSE(plain.has_weights());
    ASSERT_TRUE(plain.next(50, chunk));
    EXPECT_TRUE(chunk.gate_weights.empty());
}

TEST(GateWeights, CheckedChunkByChunkEvenWithoutIdValidation) {
    TempDir dir;
    RoutingTrace t = weighted_trace(100);
    save_trace(t, dir.file("w.npy"));
    std::vector<float> w = t.gate_weights;
    w[(90 * 3 + 2) * 2 + 1] = -0.5f;
    write_npy(dir.file("bad.npy"), w, {100, 3, 2});
    TraceOverrides o;
    o.weights_path = dir.file("bad.npy");
    TraceReader reader(dir.file("w.npy"), o);
    reader.set_validation(false);  // the profiler's mode: ids are checked elsewhere, weights still here
    RoutingTrace chunk;
    int64_t read = 0;
    const std::string msg = error_of([&] {
        while (reader.next(32, chunk)) read += chunk.num_tokens;
    });
    EXPECT_EQ(read, 64);  // the first two chunks were fine
    EXPECT_EQ(msg, dir.file("bad.npy") + ": gate weight -0.5 at token 90, layer 2, rank 1 is negative");
}

TEST(GateWeights, MissingMisshapedOrIntegerFilesFailAtOpen) {
    TempDir dir;
    const RoutingTrace t = weighted_trace(10);
    save_trace(t, dir.file("w.npy"));
    std::filesystem::remove(dir.file("w.weights.npy"));
    // The metadata names the weights file: its absence is an error naming it, before any token is read.
    try {
        TraceReader reader(dir.file("w.npy"));
        ADD_FAILURE() << "a missing weights file was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kIo);
        EXPECT_EQ(std::string(e.what()),
                  dir.file("w.npy") + ": gate weights: " + dir.file("w.weights.npy") + ": no such file");
    }
    TraceOverrides o;
    o.weights_path = dir.file("short.npy");
    write_npy(dir.file("short.npy"), std::vector<float>(9 * 6, 0.5f), {9, 3, 2});
    EXPECT_EQ(error_of([&] { TraceReader r(dir.file("w.npy"), o); }),
              dir.file("short.npy") + ": gate weights have shape [9, 3, 2] but the ids of " + dir.file("w.npy") +
                  " have [10, 3, 2]");
    o.weights_path = dir.file("int.npy");
    write_npy(dir.file("int.npy"), std::vector<int32_t>(10 * 6, 1), {10, 3, 2});
    EXPECT_EQ(error_of([&] { TraceReader r(dir.file("w.npy"), o); }),
              dir.file("int.npy") + ": gate weights must be floats, got int32");
}

TEST(Topology, ParsesAndRejects) {
    Topology t = Topology::parse("2x4");
    EXPECT_EQ(t.num_gpus(), 8);
    EXPECT_EQ(t.node_of(5), 1);
    EXPECT_EQ(t.local_index(5), 1);
    EXPECT_EQ(t.gpu_at(1, 3), 7);
    EXPECT_EQ(t.to_string(), "2x4");
    EXPECT_NE(error_of([] { Topology::parse("2x0"); }).find("has a zero"), std::string::npos);
    EXPECT_NE(error_of([] { Topology::parse("0x4"); }).find("has a zero"), std::string::npos);
    EXPECT_NE(error_of([] { Topology::parse("two"); }).find("NxM"), std::string::npos);
    EXPECT_NE(error_of([] { Topology::parse("2x-1"); }).find("NxM"), std::string::npos);
    // 65536 x 65536 used to wrap to num_gpus 0.
    EXPECT_EQ(error_of([] { Topology::parse("65536x65536"); }),
              "topology 65536x65536 has 4294967296 GPUs, more than the 65536 grace supports");
    EXPECT_EQ(Topology::parse("1x65536").num_gpus(), 65536);
    // Contiguous data-parallel blocks: 10 tokens on 4 GPUs -> 3,2,3,2 split by floor(t*G/T).
    std::vector<int> homes;
    for (int t = 0; t < 10; ++t) homes.push_back(home_gpu(t, 10, 4));
    EXPECT_EQ(homes, (std::vector<int>{0, 0, 0, 1, 1, 2, 2, 2, 3, 3}));
}

}  // namespace
}  // namespace grace
