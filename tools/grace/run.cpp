// `grace run`: replays a trace through a plan on the real MoE layer (MPI CPU reference backend), layer by layer,
// batch by batch, and reports per-phase times and bytes per link class as JSON. Under mpirun every rank runs
// this; a rank that fails aborts the whole job (MPI_Abort) with a message naming it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "command.hpp"
#include "core/rng.hpp"
#include "grace/adaptation.hpp"
#include "grace/communicator.hpp"
#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/experts.hpp"
#include "grace/io.hpp"
#include "grace/plan.hpp"
#include "grace/runtime.hpp"
#include "grace/safetensors.hpp"
#include "grace/trace.hpp"
#include "model_flags.hpp"
#ifdef GRACE_USE_CUDA
#include "grace/cuda_layer.hpp"
#endif

namespace grace::cli {
namespace {

using nlohmann::json;

struct RunOptions {
    std::string plan_path, trace_path, output;
    std::string comm = "hsc";
    std::optional<std::string> routing;
    std::optional<int> layers;            // unset: the trace's and the plan's layer count, which must agree
    std::optional<int64_t> batch_tokens;  // unset: all of a rank's tokens in one call
    bool verify = false;
    std::optional<std::string> weights_ckpt;
    std::string preset, model_config;
    uint64_t seed = 0;
    std::string dtype = "fp32";
    std::optional<int> hidden, intermediate;
    std::optional<int> first_moe_layer;
    std::string backend;
    int threads = 1;
    double tolerance = 1e-4;
    double timeout_s = 300;
    TraceOverrides overrides;
    std::optional<int> experts_flag;
    int adapt = 0;           // --adapt N: re-predict the WRR weights every N batches (adaptation.hpp)
    double adapt_decay = 0;  // --adapt-decay
};

// A failure every rank detects identically (the fingerprint check): rank 0 alone prints it and ends the job.
struct AgreedError : Error {
    AgreedError(ErrorCode code, const std::string& message) : Error(code, message) {}
};

// Upper bounds of the integer options (far above any real model; they keep products in range).
constexpr int kMaxCount = 1 << 20;  // layers, experts, a layer index
constexpr int kMaxDim = 1 << 20;    // hidden, intermediate

// A CLI11 check: a finite number >= lo (CLI::Range lets NaN through).
CLI::Validator finite_at_least(double lo) {
    return CLI::Validator(
        [lo](std::string& text) -> std::string {
            double v = 0;
            if (!CLI::detail::lexical_cast(text, v) || !std::isfinite(v) || v < lo)
                return cat("value ", text, " is not a finite number >= ", lo);
            return {};
        },
        cat("FLOAT>=", lo));
}

// A CLI11 check for a uint64 option: decimal digits only, at most 2^64 - 1 (CLI11 would wrap or saturate).
CLI::Validator digits_only() {
    return CLI::Validator(
        [](std::string& text) -> std::string {
            if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
                return cat("value ", text, " is not a non-negative integer");
            const std::string max = "18446744073709551615";  // 2^64 - 1
            const std::string digits = text.substr(std::min(text.find_first_not_of('0'), text.size() - 1));
            if (digits.size() > max.size() || (digits.size() == max.size() && digits > max))
                return cat("value ", text, " exceeds 2^64 - 1");
            return {};
        },
        "UINT64");
}

// Salts of the seeded inputs (independent of the weight streams).
constexpr uint64_t kHiddenSalt = 0x68696464656eULL;
constexpr uint64_t kGateSalt = 0x67617465ULL;

// Per-layer accumulators on one rank.
struct PhaseSums {
    double v[7] = {0, 0, 0, 0, 0, 0, 0};  // routing, layout, dispatch, expert, combine, total, overlap
    void add(const MoeCallStats& s) {
        v[0] += s.routing_s, v[1] += s.layout_s, v[2] += s.dispatch_s, v[3] += s.expert_s, v[4] += s.combine_s,
            v[5] += s.total_s, v[6] += s.overlap_s;
    }
};
const char* kPhaseNames[7] = {"routing", "layout", "dispatch", "expert", "combine", "total", "hsc_overlap"};

// [dispatch|combine][intra|cross][payload, metadata, control, copies]
struct ByteSums {
    double v[2][2][4] = {};
    void add(const MoeCallStats& s) {
        for (int c = 0; c < 2; ++c) {
            const LinkBytes* lb[2] = {&s.dispatch[c], &s.combine[c]};
            for (int d = 0; d < 2; ++d) {
                v[d][c][0] += static_cast<double>(lb[d]->payload);
                v[d][c][1] += static_cast<double>(lb[d]->metadata);
                v[d][c][2] += static_cast<double>(lb[d]->control);
                v[d][c][3] += static_cast<double>(lb[d]->copies);
            }
        }
    }
    void add_from(const ByteSums& o) {
        for (int d = 0; d < 2; ++d)
            for (int c = 0; c < 2; ++c)
                for (int i = 0; i < 4; ++i) v[d][c][i] += o.v[d][c][i];
    }
    json to_json() const {
        json out;
        const char* dir[2] = {"dispatch", "combine"};
        const char* cls[2] = {"intra_node", "cross_node"};
        for (int d = 0; d < 2; ++d)
            for (int c = 0; c < 2; ++c)
                out[dir[d]][cls[c]] = {{"payload", static_cast<int64_t>(v[d][c][0])},
                                       {"metadata", static_cast<int64_t>(v[d][c][1])},
                                       {"control", static_cast<int64_t>(v[d][c][2])},
                                       {"copies", static_cast<int64_t>(v[d][c][3])}};
        return out;
    }
};

json phase_json(Communicator& comm, const PhaseSums& p) {
    std::vector<double> mx(p.v, p.v + 7), sum(p.v, p.v + 7);
    comm.allreduce_max(mx);
    comm.allreduce_sum(sum);
    json out;
    for (int i = 0; i < 7; ++i) out[kPhaseNames[i]] = {{"max", mx[i]}, {"mean", sum[i] / comm.size()}};
    return out;
}

json bytes_json(Communicator& comm, const ByteSums& b) {
    std::vector<double> flat(std::begin(b.v[0][0]), std::begin(b.v[0][0]) + 16);
    comm.allreduce_sum(flat);
    ByteSums total;
    std::copy(flat.begin(), flat.end(), &total.v[0][0][0]);
    return total.to_json();
}

// The CPU MoeLayer, or the GPU layer when the communicator works on device memory (--backend nccl / cuda):
// both have the same forward contract.
struct LayerRunner {
    std::unique_ptr<MoeLayer> cpu;
#ifdef GRACE_USE_CUDA
    std::unique_ptr<cuda::GpuMoeLayer> gpu;
#endif
    LayerRunner(const LayerPlan& lp, const Topology& topo, Communicator& comm, std::vector<ExpertWeights> local,
                const MoeLayerOptions& mo) {
#ifdef GRACE_USE_CUDA
        if (comm.memory_space() == MemorySpace::kDevice) {
            cuda::GpuMoeLayerOptions go;
            go.scheme = mo.scheme, go.policy = mo.policy, go.routing_seed = mo.routing_seed;
            gpu = std::make_unique<cuda::GpuMoeLayer>(lp, topo, comm, std::move(local), go);
            return;
        }
#endif
        cpu = std::make_unique<MoeLayer>(lp, topo, comm, std::move(local), mo);
    }
    void forward(const float* x, const int32_t* ids, const float* w, int64_t n, int k, float* out, int64_t first) {
#ifdef GRACE_USE_CUDA
        if (gpu) return gpu->forward(x, ids, w, n, k, out, first);
#endif
        cpu->forward(x, ids, w, n, k, out, first);
    }
    const MoeCallStats& last_stats() const {
#ifdef GRACE_USE_CUDA
        if (gpu) return gpu->last_stats();
#endif
        return cpu->last_stats();
    }
    int hidden() const {
#ifdef GRACE_USE_CUDA
        if (gpu) return gpu->hidden();
#endif
        return cpu->hidden();
    }
    // Online adaptation (--adapt). The CPU layer's per-instance selections are counted on the host after every
    // call (add_batch_counts); the GPU router counts on the device, fetched once per update (take_counts).
    void start_counting() {
#ifdef GRACE_USE_CUDA
        if (gpu) gpu->set_instance_counting(true);
#endif
    }
    void add_batch_counts(const LayerPlan& lp, const int32_t* ids, int64_t n, int k, std::vector<int64_t>& counts) {
#ifdef GRACE_USE_CUDA
        if (gpu) return;
#endif
        count_instance_selections(lp, ids, cpu->last_dest_ranks().data(), n, k, counts);
    }
    void take_counts([[maybe_unused]] std::vector<int64_t>& counts) {
#ifdef GRACE_USE_CUDA
        if (gpu) gpu->take_instance_counts(counts);
#endif
    }
    void set_wrr_weights(const std::vector<std::vector<int>>& w) {
#ifdef GRACE_USE_CUDA
        if (gpu) return gpu->set_wrr_weights(w);
#endif
        cpu->router().set_wrr_weights(w);
    }
};

// --- Run fingerprint ---------------------------------------------------------------------------------------
// Every rank must run the same thing: before the first exchange, each rank describes everything that shapes
// the run in a fixed-size record, the records are gathered (one allgather), and the first field in which a
// rank differs from rank 0 fails every rank with one line. Plan and trace are compared by content (plan_hash;
// a hash of every trace byte, cheap next to reading the file); a checkpoint by its tensor index (names,
// dtypes, shapes, sizes), not by its weights. Not compared: --threads (results do not depend on it), -o,
// --dataset (metadata only) and --timeout.

constexpr int kFingerprintText = 120;
struct FingerprintField {
    uint64_t hash = 0;                  // what is compared
    char text[kFingerprintText] = {0};  // what a message shows (truncated)
};

uint64_t hash_bytes(uint64_t h, const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
    }
    uint64_t tail = 0;
    if (n > i) std::memcpy(&tail, p + i, n - i);  // (an empty vector's data() may be null)
    return splitmix64(h ^ tail ^ (static_cast<uint64_t>(n) << 3));
}
uint64_t hash_text(const std::string& s) { return hash_bytes(0x74657874ULL, s.data(), s.size()); }

uint64_t trace_hash(const RoutingTrace& t) {
    const int64_t dims[4] = {t.num_tokens, t.num_layers, t.top_k, t.num_experts};
    uint64_t h = hash_bytes(0x7472616365ULL, dims, sizeof(dims));
    h = hash_bytes(h, t.model.data(), t.model.size());
    h = hash_bytes(h, t.expert_ids.data(), t.expert_ids.size() * sizeof(int32_t));
    return hash_bytes(h, t.gate_weights.data(), t.gate_weights.size() * sizeof(float));
}

uint64_t checkpoint_index_hash(const SafetensorsCheckpoint& ckpt) {
    uint64_t h = 0x636b7074ULL;
    for (const auto& [name, info] : ckpt.tensors()) {
        h = hash_bytes(h, name.data(), name.size());
        const uint64_t meta[2] = {static_cast<uint64_t>(info.dtype), info.num_bytes};
        h = hash_bytes(h, meta, sizeof(meta));
        h = hash_bytes(h, info.shape.data(), info.shape.size() * sizeof(int64_t));
    }
    return h;
}

class RunFingerprint {
  public:
    // `name` is how the message names the field (an option, e.g. "--batch-tokens").
    void add(const std::string& name, const std::string& text, uint64_t hash) {
        names_.push_back(name);
        FingerprintField f;
        f.hash = hash;
        std::snprintf(f.text, sizeof(f.text), "%s", text.c_str());
        fields_.push_back(f);
    }
    void add(const std::string& name, const std::string& text) { add(name, text, hash_text(text)); }

    // Gathers every rank's record; throws AgreedError naming the first field where a rank differs from rank 0.
    void check_same_on_all_ranks(Communicator& comm) const {
        const size_t bytes = fields_.size() * sizeof(FingerprintField);
        const std::vector<uint8_t> all = comm.allgather_bytes(fields_.data(), bytes);
        auto field = [&](int rank, size_t i) {
            FingerprintField f;
            std::memcpy(&f, all.data() + static_cast<size_t>(rank) * bytes + i * sizeof(FingerprintField), sizeof f);
            f.text[kFingerprintText - 1] = 0;
            return f;
        };
        for (size_t i = 0; i < fields_.size(); ++i) {
            const FingerprintField ref = field(0, i);
            std::vector<int> differ;
            for (int r = 1; r < comm.size(); ++r)
                if (field(r, i).hash != ref.hash) differ.push_back(r);
            if (differ.empty()) continue;
            std::string others;
            for (size_t j = 1; j < differ.size(); ++j) others += cat(j > 1 ? ", " : "", differ[j]);
            throw AgreedError(ErrorCode::kInvalidArgument,
                              cat("ranks disagree on ", names_[i], ": rank ", differ[0], " has ", names_[i], " ",
                                  field(differ[0], i).text, " but rank 0 has ", ref.text,
                                  others.empty() ? std::string() : cat(" (rank(s) ", others, " differ too)"),
                                  "; every rank must be started with the same options and inputs"));
        }
    }

  private:
    std::vector<std::string> names_;
    std::vector<FingerprintField> fields_;
};

template <class T>
std::string or_default(const std::optional<T>& v, const char* unset) {
    return v ? cat(*v) : std::string(unset);
}

// Test hook (tests/mpi/test_run_faults.py): GRACE_TEST_STALL_RANK=r stops rank r with SIGSTOP, before the first
// exchange, or at the first batch of layer GRACE_TEST_STALL_LAYER when that is set, so that the other ranks'
// deadline (--timeout) is exercised with a rank that really does not answer.
void maybe_stall(int rank, int layer) {
    const char* r = std::getenv("GRACE_TEST_STALL_RANK");
    if (!r || std::atoi(r) != rank) return;
    const char* l = std::getenv("GRACE_TEST_STALL_LAYER");
    if ((l ? std::atoi(l) : -1) != layer) return;
    std::raise(SIGSTOP);
}

int run_impl(RunOptions& o) {
    const ExpertPlan plan = load_plan(o.plan_path);
    std::string backend = o.backend == "cuda" ? "nccl" : o.backend;  // the GPU layer runs over NCCL
    if (backend.empty()) {
        const auto built = available_backends();
        backend = std::find(built.begin(), built.end(), "mpi") != built.end() ? "mpi" : "local";
    }
    if (backend == "local" && plan.topology.num_gpus() > 1) {
        const auto built = available_backends();
        GRACE_CHECK(std::find(built.begin(), built.end(), "mpi") != built.end(), ErrorCode::kUnsupported,
                    "the plan's topology ", plan.topology.to_string(), " needs ", plan.topology.num_gpus(),
                    " ranks but this grace was built without MPI: it runs a single rank (topology 1x1) only");
    }
    auto comm = make_communicator(backend, CommunicatorOptions{plan.topology, o.timeout_s});
    const int me = comm->rank(), G = comm->size();
    set_expert_threads(o.threads);

    if (o.experts_flag) o.overrides.num_experts = *o.experts_flag;
    if (!o.overrides.num_experts) o.overrides.num_experts = plan.num_experts;
    const RoutingTrace trace = load_trace(o.trace_path, o.overrides);
    std::unique_ptr<SafetensorsCheckpoint> ckpt;
    if (o.weights_ckpt) ckpt = std::make_unique<SafetensorsCheckpoint>(*o.weights_ckpt);

    AdaptationOptions{o.adapt, 1, o.adapt_decay}.validate();
    GRACE_CHECK_ARG(o.adapt > 0 || o.adapt_decay == 0, "--adapt-decay ", o.adapt_decay, " needs --adapt N");
    // Before any exchange: every rank must have been started with the same options and inputs.
    RunFingerprint fp;
    fp.add("fingerprint format", "grace.run.fingerprint/v1");
    fp.add("--plan", cat(o.plan_path, " (plan_hash ", std::hex, plan_hash(plan), ")"), plan_hash(plan));
    fp.add("--comm", o.comm);
    fp.add("--routing", o.routing.value_or("(the plan's)"));
    fp.add("--layers", or_default(o.layers, "(all)"));
    fp.add("--batch-tokens", or_default(o.batch_tokens, "(all)"));
    fp.add("--adapt", cat(o.adapt, " decay ", o.adapt_decay));
    fp.add("--dtype", o.dtype);
    fp.add("--hidden", or_default(o.hidden, "(preset)"));
    fp.add("--intermediate", or_default(o.intermediate, "(preset)"));
    fp.add("--preset", o.preset.empty() ? std::string("(none)") : o.preset);
    fp.add("--model-config", o.model_config.empty() ? std::string("(none)") : o.model_config);
    fp.add("--weights",
           ckpt ? cat(*o.weights_ckpt, " (", ckpt->tensors().size(), " tensors, index hash ", std::hex,
                      checkpoint_index_hash(*ckpt), ")")
                : std::string("(none: seeded random)"),
           ckpt ? checkpoint_index_hash(*ckpt) : 0);
    fp.add("--first-moe-layer", or_default(o.first_moe_layer, "(default)"));
    fp.add("--seed", cat(o.seed));
    fp.add("--backend", backend);
    fp.add("--verify", o.verify ? "on" : "off");
    uint64_t tolerance_bits = 0;  // compared exactly, not as printed
    std::memcpy(&tolerance_bits, &o.tolerance, sizeof tolerance_bits);
    fp.add("--tolerance", cat(o.tolerance), tolerance_bits);
    fp.add("--experts", cat(trace.num_experts));
    fp.add("--model", trace.model.empty() ? std::string("(none)") : trace.model);
    const uint64_t th = trace_hash(trace);
    fp.add("--trace",
           cat(o.trace_path, " (", trace.num_tokens, " tokens, ", trace.num_layers, " layers, ",
               trace.has_weights() ? "with" : "without", " gate weights, hash ", std::hex, th, ")"),
           th);
    maybe_stall(me, -1);
    fp.check_same_on_all_ranks(*comm);

    // The checks below see the same inputs on every rank (just checked), so they fail on all ranks alike.
    int L = 0, first_moe_layer = 0;
    CommScheme scheme{};
    DType dtype{};
    ExpertShape shape{};
    try {
        GRACE_CHECK_INPUT(trace.num_experts == plan.num_experts, "trace has ", trace.num_experts,
                          " experts but the plan has ", plan.num_experts);
        GRACE_CHECK_INPUT(trace.top_k == plan.top_k, "trace has top_k ", trace.top_k, " but the plan has ", plan.top_k);
        // Running fewer layers than the inputs have is allowed only when asked for (--layers N).
        GRACE_CHECK_INPUT(o.layers || trace.num_layers == plan.num_layers, "the trace has ", trace.num_layers,
                          " layers but the plan has ", plan.num_layers,
                          ": give --layers N (N <= ", std::min(trace.num_layers, plan.num_layers),
                          ") to run only the first N layers");
        L = o.layers.value_or(trace.num_layers);
        GRACE_CHECK_ARG(L <= trace.num_layers && L <= plan.num_layers, "--layers ", L, " exceeds the trace's ",
                        trace.num_layers, " or the plan's ", plan.num_layers, " layers");
        scheme = parse_comm_scheme(o.comm);
        dtype = parse_dtype(o.dtype);
        GRACE_CHECK_ARG(dtype != DType::kF16, "--dtype must be fp32 or bf16");

        // Expert shape and weight source. --model-config must match the trace (E, MoE layers, and --hidden /
        // --intermediate if given); a preset (--preset, or the trace's model) gives the defaults they override.
        shape = {o.hidden.value_or(0), o.intermediate.value_or(0)};
        first_moe_layer = o.first_moe_layer.value_or(0);
        if (!o.model_config.empty()) {
            const ModelConfig model = load_model_config(o.model_config);
            HardwareModel overrides;
            overrides.hidden = shape.hidden, overrides.intermediate = shape.intermediate;
            check_model_shape(explicit_model_shape(overrides, model), trace.num_experts, trace.num_layers,
                              "the trace");
            shape = {model.hidden, model.intermediate};
            if (!o.first_moe_layer) first_moe_layer = model.moe_layers[0];
            // A checkpoint is read as MoE layer l = checkpoint layer l + first_moe_layer.
            GRACE_CHECK_ARG(!ckpt || o.first_moe_layer ||
                                model.moe_layers.back() - model.moe_layers[0] + 1 == model.num_moe_layers(),
                            o.model_config, ": its MoE layers are not contiguous; give --first-moe-layer");
        }
        if (ckpt) {
            if (!o.preset.empty() && !o.first_moe_layer && o.model_config.empty())
                first_moe_layer = model_config_preset(o.preset).moe_layers[0];
        } else {
            // No checkpoint: a shape not given in full comes from --preset, else from the trace's model if that is
            // a known preset.
            if (o.preset.empty() && (shape.hidden == 0 || shape.intermediate == 0) &&
                find_model_config_preset(trace.model))
                o.preset = trace.model;
            if (!o.preset.empty()) {
                const ModelConfig& p = model_config_preset(o.preset);
                if (shape.hidden == 0) shape.hidden = p.hidden;
                if (shape.intermediate == 0) shape.intermediate = p.intermediate;
            }
            GRACE_CHECK_ARG(shape.hidden > 0 || shape.intermediate > 0, "the trace's model '", trace.model,
                            "' is no preset: give --weights CKPT, --model-config CONFIG.json, or --preset P (and/or ",
                            "--hidden H --intermediate I) for a seeded random init");
            GRACE_CHECK_ARG(shape.hidden > 0 && shape.intermediate > 0,
                            shape.hidden > 0 ? cat("--hidden ", shape.hidden, " needs --intermediate I")
                                             : cat("--intermediate ", shape.intermediate, " needs --hidden H"),
                            " (the trace's model '", trace.model, "' is no preset and no --preset was given)");
        }
    } catch (const AgreedError&) {
        throw;
    } catch (const Error& e) {
        throw AgreedError(e.code(), e.what());
    }
    auto make_expert = [&](int layer, int e) {
        if (ckpt)
            return load_expert(*ckpt, layer + first_moe_layer, e, dtype, shape.hidden > 0 ? shape : ExpertShape{});
        return random_expert(o.seed, layer, e, shape, dtype);
    };

    // This rank's tokens: the home_gpu blocks of the whole trace.
    const int64_t T = trace.num_tokens;
    auto block_begin = [&](int g) { return static_cast<int64_t>((static_cast<__int128>(g) * T + G - 1) / G); };
    const int64_t begin = block_begin(me), end = block_begin(me + 1);
    for (int64_t t : {begin, end - 1})
        if (t >= begin && t < end) GRACE_ASSERT(home_gpu(t, T, G) == me);
    const int64_t T_local = end - begin;
    int64_t max_local = 0;
    for (int g = 0; g < G; ++g) max_local = std::max(max_local, block_begin(g + 1) - block_begin(g));
    const int64_t B = o.batch_tokens.value_or(std::max<int64_t>(max_local, 1));
    const int64_t steps = max_local == 0 ? 0 : 1 + (max_local - 1) / B;  // no overflow for B near INT64_MAX
    const int k = trace.top_k;

    int H = 0;
    std::vector<float> hidden;  // [T_local, H], residual stream carried across layers
    const char* fail_env = std::getenv("GRACE_FAIL_RANK");
    const int fail_rank = fail_env ? std::atoi(fail_env) : -1;
    const char* fail_layer_env = std::getenv("GRACE_FAIL_LAYER");
    const int fail_layer = fail_layer_env ? std::atoi(fail_layer_env) : 0;

    json per_layer = json::array();
    std::vector<uint64_t> adapt_hashes;
    std::vector<std::vector<std::vector<int>>> adapt_weights;
    int adapt_updates = 0;
    PhaseSums all_phases;
    ByteSums all_bytes;
    double worst_err = 0, worst_abs = 0;
    int64_t expert_rows = 0;
    std::string worst_where;
    for (int l = 0; l < L; ++l) {
        const LayerPlan& lp = plan.layers[l];
        // Seeded random experts are independent of each other: built over --threads (a checkpoint is read in order).
        const std::vector<int>& mine = lp.gpu_experts[me];
        std::vector<ExpertWeights> local(mine.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(o.threads) if (!ckpt)
        for (size_t i = 0; i < mine.size(); ++i) local[i] = make_expert(l, mine[i]);
        std::vector<ExpertWeights> all;  // --verify: every expert, for the dense reference
        if (o.verify) {
            all.resize(plan.num_experts);
#pragma omp parallel for schedule(dynamic, 1) num_threads(o.threads) if (!ckpt)
            for (int e = 0; e < plan.num_experts; ++e) {
                all[e] = make_expert(l, e);
                // The reference reads fp32: widen bf16 weights once (exact) rather than per multiply-add.
                if (all[e].storage == DType::kBF16) {
                    ExpertWeights& w = all[e];
                    auto widen = [](std::vector<uint16_t>& b, std::vector<float>& f) {
                        f.resize(b.size());
                        for (size_t i = 0; i < b.size(); ++i) f[i] = bf16_to_float(b[i]);
                        std::vector<uint16_t>().swap(b);
                    };
                    widen(w.gate_bf16, w.gate), widen(w.up_bf16, w.up), widen(w.down_bf16, w.down);
                    w.storage = DType::kF32;
                }
            }
        }
        MoeLayerOptions mo;
        mo.scheme = scheme;
        mo.policy = o.routing ? parse_routing_policy(*o.routing) : lp.policy;
        mo.routing_seed = o.seed;
        LayerRunner layer(lp, plan.topology, *comm, std::move(local), mo);
        std::optional<WrrAdapter> adapter;
        std::vector<int64_t> interval_counts;
        if (o.adapt > 0) {
            GRACE_CHECK_ARG(mo.policy == RoutingPolicy::kWrr || mo.policy == RoutingPolicy::kTar,
                            "--adapt re-predicts WRR weights, so it needs the wrr or tar routing policy; layer ", l,
                            " routes with ", to_string(mo.policy));
            adapter.emplace(lp, G, AdaptationOptions{o.adapt, B, o.adapt_decay});
            interval_counts.assign(adapter->num_instances(), 0);
            layer.start_counting();
        }
        if (l == 0) {
            H = layer.hidden();
            hidden.resize(static_cast<size_t>(T_local) * H);
            for (int64_t t = 0; t < T_local; ++t)
                for (int h = 0; h < H; ++h)
                    hidden[t * H + h] =
                        static_cast<float>(2.0 * to_unit(mix64(o.seed ^ kHiddenSalt, static_cast<uint64_t>(begin + t),
                                                               static_cast<uint64_t>(h))) -
                                           1.0);
        }
        GRACE_CHECK_INPUT(layer.hidden() == H, "layer ", l, " experts have hidden size ", layer.hidden(),
                          ", layer 0 had ", H);
        PhaseSums phases;
        ByteSums bytes;
        double layer_err = 0;
        int64_t layer_rows = 0;
        std::vector<int32_t> ids;
        std::vector<float> gates, out;
        ExpertWorkspace ws;
        for (int64_t step = 0; step < steps; ++step) {
            if (step == 0) maybe_stall(me, l);
            if (me == fail_rank && l == fail_layer)
                throw Error(ErrorCode::kInternal,
                            cat("injected failure (GRACE_FAIL_RANK=", fail_rank, ") at layer ", l, " batch ", step));
            const int64_t b0 = std::min(T_local, step * B), b1 = b0 + std::min(B, T_local - b0);
            const int64_t n = b1 - b0;
            ids.resize(static_cast<size_t>(n) * k);
            gates.resize(static_cast<size_t>(n) * k);
            for (int64_t t = 0; t < n; ++t) {
                const int64_t tg = begin + b0 + t;
                double sum = 0;
                for (int j = 0; j < k; ++j) {
                    ids[t * k + j] = trace.id(tg, l, j);
                    double w =
                        trace.has_weights()
                            ? trace.gate_weights[(tg * trace.num_layers + l) * k + j]
                            : 0.5 + to_unit(mix64(o.seed ^ kGateSalt, static_cast<uint64_t>(tg * trace.num_layers + l),
                                                  static_cast<uint64_t>(j)));
                    gates[t * k + j] = static_cast<float>(w);
                    sum += w;
                }
                if (!trace.has_weights())
                    for (int j = 0; j < k; ++j) gates[t * k + j] = static_cast<float>(gates[t * k + j] / sum);
            }
            out.resize(static_cast<size_t>(n) * H);
            const float* x = hidden.data() + b0 * H;
            layer.forward(x, ids.data(), gates.data(), n, k, out.data(), begin + b0);
            if (adapter) {
                // Every rank reaches every step, so the sum over ranks is one collective per update.
                layer.add_batch_counts(lp, ids.data(), n, k, interval_counts);
                if (adapter->due(step)) {
                    layer.take_counts(interval_counts);
                    std::vector<double> sum(interval_counts.begin(), interval_counts.end());
                    comm->allreduce_sum(sum);
                    for (size_t i = 0; i < sum.size(); ++i) interval_counts[i] = static_cast<int64_t>(sum[i]);
                    layer.set_wrr_weights(adapter->update(interval_counts));
                    std::fill(interval_counts.begin(), interval_counts.end(), 0);
                }
            }
            phases.add(layer.last_stats());
            bytes.add(layer.last_stats());
            layer_rows += layer.last_stats().expert_rows;
            if (o.verify) {
                // Dense reference: each token, sum_j w_j * expert_{e_j}(x) with the plain-loop SwiGLU. Tokens are
                // independent, so they are spread over --threads; the reduction below is sequential (same result
                // for any thread count).
                std::vector<double> tok_err(static_cast<size_t>(n)), tok_abs(static_cast<size_t>(n));
#pragma omp parallel num_threads(o.threads)
                {
                    std::vector<float> ref(H), mag(H), ref_y(H);
#pragma omp for schedule(dynamic, 8)
                    for (int64_t t = 0; t < n; ++t) {
                        std::fill(ref.begin(), ref.end(), 0.0f);
                        std::fill(mag.begin(), mag.end(), 0.0f);
                        for (int j = 0; j < k; ++j) {
                            const int e = ids[t * k + j];
                            if (e < 0) continue;
                            expert_forward_reference(all[e], x + t * H, 1, ref_y.data());
                            for (int h = 0; h < H; ++h) {
                                ref[h] += gates[t * k + j] * ref_y[h];
                                mag[h] += std::fabs(gates[t * k + j] * ref_y[h]);
                            }
                        }
                        float scale = 0, diff = 0;
                        for (int h = 0; h < H; ++h) {
                            scale = std::max(scale, mag[h]);
                            diff = std::max(diff, std::fabs(out[t * H + h] - ref[h]));
                        }
                        tok_err[t] = scale > 0 ? diff / scale : diff;
                        tok_abs[t] = diff;
                    }
                }
                for (int64_t t = 0; t < n; ++t) {
                    worst_abs = std::max(worst_abs, tok_abs[t]);
                    if (tok_err[t] > worst_err) {
                        worst_err = tok_err[t];
                        worst_where = cat("layer ", l, " token ", begin + b0 + t);
                    }
                    layer_err = std::max(layer_err, tok_err[t]);
                }
            }
            // Residual stream: the next layer sees x + moe(x).
            float* hx = hidden.data() + b0 * H;
            for (int64_t i = 0; i < n * H; ++i) hx[i] += out[i];
        }
        all_bytes.add_from(bytes);
        for (int i = 0; i < 7; ++i) all_phases.v[i] += phases.v[i];
        expert_rows += layer_rows;
        std::vector<double> agg{static_cast<double>(layer_rows), layer_err};
        std::vector<double> rows_sum{agg[0]}, err_max{agg[1]};
        comm->allreduce_sum(rows_sum);
        comm->allreduce_max(err_max);
        json lj = {{"layer", l},
                   {"policy", to_string(mo.policy)},
                   {"time_s", phase_json(*comm, phases)},
                   {"bytes", bytes_json(*comm, bytes)},
                   {"expert_rows", static_cast<int64_t>(rows_sum[0])}};
        if (o.verify) lj["max_rel_err"] = err_max[0];
        if (adapter) {
            adapt_hashes.push_back(adapter->tables_hash());
            adapt_weights.push_back(adapter->weights());
            adapt_updates = adapter->updates();
        }
        per_layer.push_back(lj);
    }
    std::vector<double> errs{worst_err, worst_abs};
    comm->allreduce_max(errs);
    json report = {{"format", "grace.run/v1"},
                   {"plan", o.plan_path},
                   {"plan_hash", cat(std::hex, plan_hash(plan))},
                   {"trace", o.trace_path},
                   {"topology", plan.topology.to_string()},
                   {"backend", comm->backend()},
                   {"scheme", to_string(scheme)},
                   {"routing", o.routing ? *o.routing : std::string("plan")},
                   {"num_tokens", T},
                   {"layers", L},
                   {"batch_tokens", B},
                   {"steps_per_layer", steps},
                   {"hidden", H},
                   {"top_k", k},
                   {"dtype", to_string(dtype)},
                   {"weights", ckpt ? o.weights_ckpt.value() : cat("random(seed=", o.seed, ")")},
                   {"wire_bytes_per_element", 4},
                   {"time_s", phase_json(*comm, all_phases)},
                   {"bytes", bytes_json(*comm, all_bytes)},
                   {"per_layer", per_layer}};
    if (o.adapt > 0) {
        std::ostringstream hash;
        hash << std::hex << std::setw(16) << std::setfill('0') << combine_tables_hashes(adapt_hashes);
        report["adaptation"] = {{"interval_batches", o.adapt},
                                {"batch_tokens_per_gpu", B},
                                {"decay", o.adapt_decay},
                                {"batches", steps},
                                {"updates", adapt_updates},
                                {"tables_hash", hash.str()},
                                {"final_wrr_weights", adapt_weights}};
    }
    const bool passed = !o.verify || errs[0] <= o.tolerance;
    if (o.verify)
        report["verify"] = {{"max_rel_err", errs[0]},
                            {"max_abs_err", errs[1]},
                            {"tolerance", o.tolerance},
                            {"passed", passed},
                            {"metric", "max over tokens of max_h |y - y_ref| / max_h sum_j |w_j f_j(x)_h|"}};
    if (me == 0) {
        write_text_atomic(o.output, report.dump(2) + "\n");
        std::cout << "grace run: " << plan.topology.to_string() << " " << to_string(scheme) << ", " << L << " layers x "
                  << steps << " steps, total " << report["time_s"]["total"]["max"].get<double>()
                  << " s (max over ranks)";
        if (o.verify) std::cout << ", verify max_rel_err " << errs[0] << (passed ? " (passed)" : " (FAILED)");
        std::cout << " -> " << o.output << "\n";
    }
    comm->barrier();
    GRACE_CHECK_INPUT(passed, "verify failed: max relative error ", errs[0], " exceeds the tolerance ", o.tolerance,
                      me == 0 && !worst_where.empty() ? cat(" (rank 0: ", worst_where, ")") : std::string());
    return 0;
}

int run_command(RunOptions& o) {
    const int nproc = launched_process_count();
    try {
        return run_impl(o);
    } catch (const AgreedError& e) {
        // Every rank found the same mismatch: rank 0 prints it once and ends the job; the others wait to be
        // ended, and end it themselves should rank 0 not do so.
        if (nproc > 1) {
            const int me = launched_process_rank();
            if (me != 0) std::this_thread::sleep_for(std::chrono::seconds(10));
            abort_launched_job(1, cat("grace: error: ", me == 0 ? "" : cat("rank ", me, ": "), e.what()));
        }
        throw;
    } catch (const std::exception& e) {
        // A failing rank must end the whole job: the others may be blocked in a collective.
        if (nproc > 1)
            abort_launched_job(
                1, cat("grace: error: rank ", launched_process_rank(), " (host ", host_name(), "): ", e.what()));
        throw;
    }
}

GRACE_COMMAND(
    "run", "Replay a trace through a plan on the real MoE layer (MPI runtime); per-phase times and bytes",
    [](CLI::App& sub) -> std::function<int()> {
        auto o = std::make_shared<RunOptions>();
        sub.add_option("--plan", o->plan_path, "Plan file (grace.plan/v1)")->required();
        sub.add_option("--trace", o->trace_path, "Routing trace (.npy)")->required();
        sub.add_option("--comm", o->comm, "Dispatch scheme: flat, flat-dedup or hsc")
            ->default_val("hsc")
            ->check(CLI::IsMember({"flat", "flat-dedup", "hsc"}));
        sub.add_option("--routing", o->routing, "Replica routing policy (default: the plan's per layer)")
            ->check(CLI::IsMember({"primary", "wrr", "tar", "vllm", "sglang-static", "sglang-dynamic"}));
        sub.add_option("--layers", o->layers,
                       "Run only the first N layers (default: all; the trace and the plan must then have as many)")
            ->check(CLI::Range(1, kMaxCount));
        sub.add_option("--batch-tokens", o->batch_tokens, "Tokens per rank per forward call (default: all)")
            ->check(CLI::Range(int64_t{1}, std::numeric_limits<int64_t>::max()));
        sub.add_option("--adapt", o->adapt,
                       "Re-predict the WRR weights from the counts of all ranks every N batches (docs/eval.md)")
            ->check(CLI::Range(1, kMaxCount));
        sub.add_option("--adapt-decay", o->adapt_decay, "With --adapt: weight of the older history in [0, 1)")
            ->check(adapt_decay_value());
        sub.add_flag("--verify", o->verify, "Compare every output with a dense single-process reference");
        sub.add_option("--tolerance", o->tolerance, "Relative tolerance of --verify")
            ->default_val(1e-4)
            ->check(finite_at_least(0));
        sub.add_option("--weights", o->weights_ckpt, "Hugging Face safetensors checkpoint (file or folder)");
        sub.add_option("--preset", o->preset, "Model preset for a seeded random init (olmoe, ...; docs/models.md)");
        add_model_config_flag(sub, o->model_config);
        sub.add_option("--seed", o->seed, "Seed of the random weights, inputs and gates")
            ->default_val(0)
            ->check(digits_only());  // "-1" would otherwise wrap to 2^64 - 1
        sub.add_option("--dtype", o->dtype, "Weight storage: fp32 or bf16")
            ->default_val("fp32")
            ->check(CLI::IsMember({"fp32", "bf16"}));
        sub.add_option("--hidden", o->hidden, "Hidden size H (overrides the preset)")->check(CLI::Range(1, kMaxDim));
        sub.add_option("--intermediate", o->intermediate, "Expert intermediate size I (overrides the preset)")
            ->check(CLI::Range(1, kMaxDim));
        sub.add_option("--first-moe-layer", o->first_moe_layer,
                       "Checkpoint layer of MoE layer 0 (DeepSeek-V2: 1; default from --preset, else 0)")
            ->check(CLI::Range(0, kMaxCount));
        sub.add_option(
               "--backend", o->backend,
               "Communicator backend: mpi or local (default: mpi if built); nccl (alias cuda) runs the GPU layer")
            ->check(CLI::IsMember({"mpi", "local", "nccl", "cuda"}));
        sub.add_option("--threads", o->threads, "Eigen threads per rank (also the threads of the --verify reference)")
            ->default_val(1)
            ->check(CLI::Range(1, 4096));
        sub.add_option("--timeout", o->timeout_s,
                       "Seconds any rank waits for the others in one exchange before the job is ended, naming "
                       "the rank(s) that did not answer (0 = wait forever)")
            ->default_val(300)
            ->check(finite_at_least(0));
        sub.add_option("-o,--output", o->output, "Report (JSON)")->required();
        sub.add_option("--experts", o->experts_flag, "Number of experts E (default: the plan's)")
            ->check(CLI::Range(1, kMaxCount));
        sub.add_option_function<std::string>(
            "--gate-weights", [o](const std::string& v) { o->overrides.weights_path = v; },
            "Gate weights .npy [T, L, k] (overrides the trace's metadata; default: seeded)");
        sub.add_option_function<std::string>(
            "--model", [o](const std::string& v) { o->overrides.model = v; },
            "Model name (overrides the trace's metadata; a preset name gives the expert shape)");
        sub.add_option_function<std::string>(
            "--dataset", [o](const std::string& v) { o->overrides.dataset = v; }, "Dataset name (overrides metadata)");
        return [o] { return run_command(*o); };
    },
    60);

}  // namespace
}  // namespace grace::cli
