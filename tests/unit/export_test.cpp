// Exports: each format read back describes the plan's placement (plus padding replicas, never duplicates).
#include "grace/export.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "grace/error.hpp"
#include "grace/npy.hpp"
#include "grace/planner.hpp"
#include "unit/planner_test_util.hpp"
#include "unit/test_util.hpp"

namespace grace {
namespace {

struct Case {
    ExportFormat format;
    std::string file;
};

TEST(Export, RoundTripEveryFormat) {
    testing::TempDir dir;
    const RoutingStats st = testing::make_random_stats(3, 32, 4, 600, 9);
    PlanOptions opt;
    opt.method = "grace";  // DR gives GPUs different instance counts: padding is needed
    const ExpertPlan plan = make_plan(st, Topology{2, 4, 8}, opt);
    const int G = 8, E = 32;
    int max_count = 0, total = 0;
    for (const auto& lp : plan.layers)
        for (const auto& ex : lp.gpu_experts) max_count = std::max<int>(max_count, ex.size()), total += ex.size();
    std::vector<double> load(st.load.begin(), st.load.end());
    const std::vector<Case> cases = {{ExportFormat::kSglang, dir.file("sglang.json")},
                                     {ExportFormat::kVllmAscend, dir.file("vllm.json")},
                                     {ExportFormat::kTrtllm, dir.file("trtllm.yaml")},
                                     {ExportFormat::kEplb, dir.file("eplb.json")},
                                     {ExportFormat::kEplb, dir.file("eplb_npy")}};
    std::vector<std::vector<std::vector<int>>> first;
    for (const Case& c : cases) {
        for (int offset : {0, 3}) {
            ExportOptions eo;
            eo.format = c.format;
            eo.expert_load = load;
            eo.layer_offset = offset;
            const PhysicalMap m = export_plan(plan, eo, c.file);
            EXPECT_EQ(m.slots_per_gpu, max_count);
            EXPECT_EQ(m.num_padded, plan.num_layers * G * max_count - total);
            const auto back = read_export(c.file, c.format, G, offset);
            ASSERT_EQ(back.size(), 3u) << to_string(c.format);
            for (int l = 0; l < 3; ++l) {
                ASSERT_EQ(back[l].size(), static_cast<size_t>(G));
                for (int g = 0; g < G; ++g) {
                    const auto& got = back[l][g];
                    EXPECT_EQ(static_cast<int>(got.size()), max_count);
                    std::set<int> s(got.begin(), got.end());
                    EXPECT_EQ(s.size(), got.size()) << "duplicate expert on a GPU";
                    for (int e : plan.layers[l].gpu_experts[g]) EXPECT_TRUE(s.count(e)) << to_string(c.format);
                    for (int e : got) EXPECT_TRUE(e >= 0 && e < E);
                }
            }
            if (first.empty()) first = back;
            EXPECT_EQ(back, first) << to_string(c.format) << ": every format describes the same placement";
        }
    }
}

TEST(Export, EplbTripleIsConsistent) {
    testing::TempDir dir;
    const RoutingStats st = testing::make_random_stats(2, 16, 2, 300, 2);
    PlanOptions opt;
    opt.method = "occult+dynamic+wrr";
    const ExpertPlan plan = make_plan(st, Topology{1, 4, std::nullopt}, opt);
    ExportOptions eo;
    eo.format = ExportFormat::kEplb;
    export_plan(plan, eo, dir.file("e.json"));
    const auto j = nlohmann::json::parse(testing::read_bytes(dir.file("e.json")));
    const auto p2l = j.at("phy2log").get<std::vector<std::vector<int>>>();
    const auto l2p = j.at("log2phy").get<std::vector<std::vector<std::vector<int>>>>();
    const auto cnt = j.at("logcnt").get<std::vector<std::vector<int>>>();
    for (size_t l = 0; l < p2l.size(); ++l)
        for (int e = 0; e < 16; ++e) {
            int valid = 0;
            for (int p : l2p[l][e]) {
                if (p < 0) continue;
                ++valid;
                EXPECT_EQ(p2l[l][p], e);
            }
            EXPECT_EQ(valid, cnt[l][e]);
            EXPECT_EQ(valid, std::count(p2l[l].begin(), p2l[l].end(), e));
        }
    // the .npy folder holds the same arrays
    export_plan(plan, eo, dir.file("npy"));
    std::vector<int64_t> shape;
    const auto cnt_npy = read_npy_int(dir.file("npy") + "/logcnt.npy", &shape);
    ASSERT_EQ(shape, (std::vector<int64_t>{2, 16}));
    for (int l = 0; l < 2; ++l)
        for (int e = 0; e < 16; ++e) EXPECT_EQ(cnt_npy[l * 16 + e], cnt[l][e]);
}

TEST(Export, TrtllmYamlShape) {
    testing::TempDir dir;
    const RoutingStats st = testing::make_random_stats(2, 8, 2, 100, 4);
    PlanOptions opt;
    opt.method = "vanilla";
    const ExpertPlan plan = make_plan(st, Topology{1, 2, std::nullopt}, opt);
    ExportOptions eo;
    eo.format = ExportFormat::kTrtllm;
    eo.layer_offset = 3;
    export_plan(plan, eo, dir.file("t.yaml"));
    EXPECT_EQ(testing::read_bytes(dir.file("t.yaml")),
              "initial_global_assignments:\n  3: [0, 1, 2, 3, 4, 5, 6, 7]\n  4: [0, 1, 2, 3, 4, 5, 6, 7]\n"
              "num_slots: 8\nlayer_updates_per_iter: 0\n");
    EXPECT_THROW(parse_export_format("deepep"), Error);
}

TEST(ExportLimits, LayerOffsetIsBoundedAndIntegersAreChecked) {
    testing::TempDir dir;
    const RoutingStats st = testing::make_random_stats(2, 16, 2, 300, 2);
    const ExpertPlan plan = make_plan(st, Topology{1, 4, std::nullopt}, PlanOptions{});
    ExportOptions eo;
    eo.format = ExportFormat::kSglang;
    // 2^31-1 used to write 2^31-1 trivial rows, without end.
    eo.layer_offset = 2147483647;
    const std::string bound =
        "export: layer offset 2147483647 is outside [0, 10000] (it is the model layer index of "
        "MoE layer 0)";
    EXPECT_EQ(testing::error_of([&] { export_plan(plan, eo, dir.file("s.json")); }), bound);
    EXPECT_EQ(testing::error_of([&] { export_text(build_physical_map(plan), eo); }), bound);
    EXPECT_FALSE(std::filesystem::exists(dir.file("s.json")));
    eo.layer_offset = -1;
    EXPECT_NE(testing::error_of([&] { export_plan(plan, eo, dir.file("s.json")); }).find("layer offset -1"),
              std::string::npos);
    eo.layer_offset = kMaxLayerOffset;
    export_plan(plan, eo, dir.file("s.json"));
    EXPECT_EQ(read_export(dir.file("s.json"), ExportFormat::kSglang, 4, kMaxLayerOffset).size(), 2u);
    // Reading back: a slot of 2^32 + 1 is not read as 1.
    testing::write_bytes(dir.file("wrap.json"), R"({"physical_to_logical_map": [[0, 4294967297, 2, 3]]})");
    EXPECT_EQ(testing::error_of([&] { read_export(dir.file("wrap.json"), ExportFormat::kSglang, 4); }),
              "export " + dir.file("wrap.json") +
                  ": physical_to_logical_map[0][1]: 4294967297 is outside [-2147483648, 2147483647]");
    testing::write_bytes(dir.file("wrap.yaml"), "initial_global_assignments:\n  0: [0, 4294967297, 2, 3]\n");
    EXPECT_NE(testing::error_of([&] {
                  read_export(dir.file("wrap.yaml"), ExportFormat::kTrtllm, 4);
              }).find("'4294967297' is not a 32-bit integer"),
              std::string::npos);
}

}  // namespace
}  // namespace grace
