#pragma once
/// @file eval.hpp
/// The evaluator (spec §5-§7): replays a routing trace through an ExpertPlan with a routing policy, counts every
/// token copy under a communication scheme, and prices the counts with the cost model of hardware.hpp.
///
/// Replay: one ReplicaRouter per layer (WRR and TAR are stateful), tokens in trace order; token t of a trace of
/// T tokens starts on GPU home_gpu(t, T, G). Each of its k selections is routed to a destination GPU. Counting
/// (spec §6), for one token with home h and destination set D:
///   flat / 2dh: one copy per selection whose destination d != h, sent h -> d;
///   flat-dedup: one copy per distinct d in D, d != h, sent h -> d;
///   hsc: one cross-node copy h -> p(b) = b*M + h%M per distinct remote node b of D; then, inside node b, one
///        copy p(b) -> d per distinct d in D on b with d != p(b); on the home node one copy h -> d per distinct
///        d != h.
/// A copy is "cross-node" when source and destination GPU are on different nodes, else "intra-node".
/// Copies are counted for dispatch; combine sends the same copies back (the transposed matrix), so every
/// copy/byte figure below is per direction. Bytes = copies * H * element_size (activations only; ids and
/// gate weights are metadata, not counted).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grace/engine_routing.hpp"
#include "grace/hardware.hpp"
#include "grace/model_config.hpp"
#include "grace/plan.hpp"
#include "grace/topology.hpp"
#include "grace/trace.hpp"
#include "grace/workload.hpp"

namespace grace {

/// Communication scheme of the all-to-all (spec §6).
enum class CommScheme {
    kFlat,       ///< one copy per selection, one synchronized all-to-all (MegaBlocks / Tutel style)
    kFlatDedup,  ///< one copy per destination GPU (DeepEP intranode / Occult style)
    k2dh,        ///< Tutel's 2D-hierarchical all-to-all: flat's volume, fewer and larger cross-node messages
    kHsc,        ///< hierarchical sparse: one copy per destination node to the peer GPU, then intra-node
};

/// "flat", "flat-dedup", "2dh", "hsc".
std::string to_string(CommScheme scheme);
/// Inverse of to_string; throws kInvalidArgument listing the valid names.
CommScheme parse_comm_scheme(const std::string& name);

/// Dispatch copies of one layer under one scheme between every ordered pair of GPUs.
struct TrafficMatrix {
    int num_gpus = 0;               ///< G
    std::vector<int64_t> copies;    ///< [G, G] row-major: copies[s*G + d] = token copies GPU s sends to GPU d;
                                    ///< the diagonal is 0 (a GPU does not send to itself)
    int64_t cross_node_copies = 0;  ///< sum of copies[s][d] with node(s) != node(d)
    int64_t intra_node_copies = 0;  ///< sum of copies[s][d] with node(s) == node(d), s != d

    /// copies[s*G + d].
    int64_t at(int s, int d) const { return copies[static_cast<size_t>(s) * num_gpus + d]; }
};

/// Everything the replay of one layer under one routing policy counts; every scheme at once.
struct LayerCounts {
    int layer = 0;
    int64_t num_tokens = 0;                           ///< tokens replayed
    int64_t local_selections = 0;                     ///< selections routed to the token's home GPU
    std::vector<std::vector<int64_t>> instance_load;  ///< [E][n_e]: selections per instance (instance_gpus order)
    std::vector<int64_t> gpu_load;                    ///< [G]: selections processed per GPU
    TrafficMatrix flat;                               ///< flat and 2dh
    TrafficMatrix flat_dedup;                         ///< flat-dedup
    TrafficMatrix hsc;                                ///< hsc (stage 1 = the cross-node entries, stage 2 = intra)

    /// The matrix of `scheme` (2dh shares flat's).
    const TrafficMatrix& traffic(CommScheme scheme) const;
};

/// Replay settings.
struct ReplayOptions {
    /// Routing policy for every layer; unset = each layer's plan policy.
    std::optional<RoutingPolicy> policy;
    /// Seed of the sglang-dynamic policy; unset = the plan's seed. (SGLang's static tables always use 42.)
    std::optional<uint64_t> seed;
    /// Physical slots the engine policies route over (an engine's loaded placement, see engine_eval.hpp): one
    /// per model layer of the engine's file, leading (dense) layers first; empty = each plan layer's own slots.
    std::vector<SlotMap> slot_maps;
    int num_threads = 0;  ///< 0 = all; results are identical for any count (layers are independent)
};

/// Streaming replay of a trace through a plan: feed it the trace's tokens in order, in chunks of any size.
/// Memory is O(L * (G^2 + instances)) plus the routers, independent of T.
class Replayer {
  public:
    /// `total_tokens` is T of the whole trace (it fixes every token's home GPU). Throws kInvalidInput if the
    /// plan is invalid, kInvalidArgument if total_tokens < 1.
    Replayer(const ExpertPlan& plan, int64_t total_tokens, const ReplayOptions& options = {});
    ~Replayer();
    Replayer(Replayer&&) noexcept;
    Replayer& operator=(Replayer&&) noexcept;

    /// Replays layer `layer` of `chunk` (tokens first_token .. first_token + chunk.num_tokens - 1 of the whole
    /// trace). Chunks must come in token order per layer; different layers may be fed from different threads.
    /// Throws kInvalidInput if the chunk's E or L does not match the plan, or the tokens run past T.
    void consume_layer(const RoutingTrace& chunk, int64_t first_token, int layer);
    /// consume_layer on raw ids: token i's k ids are at ids + i * stride (stride = L*k for a [T, L, k] chunk, k
    /// for a layer-major copy, see LayerMajorIds). Every id is checked while it is routed: one outside [0, E) or
    /// repeated within a token's top-k throws kInvalidInput worded as TraceReader's check, and leaves the layer's
    /// counts unusable.
    void consume_layer_ids(const int32_t* ids, size_t stride, int64_t num_tokens, int top_k, int64_t first_token,
                           int layer);
    /// consume_layer for every layer, layers spread over options.num_threads threads; the chunk is replayed in
    /// cache-sized tiles of tokens. A bad id throws for the first bad (token, layer) in trace order, whatever the
    /// thread count.
    void consume(const RoutingTrace& chunk, int64_t first_token);
    /// consume for tokens begin .. begin + count - 1 of `chunk` only (trace tokens first_token + begin, ...).
    /// Throws kInvalidArgument for a range outside the chunk, else as consume.
    void consume_range(const RoutingTrace& chunk, int64_t first_token, int64_t begin, int64_t count);
    /// Starts a batch (one forward pass): trace tokens first_token .. first_token + num_tokens - 1, which must
    /// come next for every layer. Their home GPUs are spread over the batch (token t starts on
    /// home_gpu(t - first_token, num_tokens, G)), the engine policies count a token's index from its home GPU's
    /// first token of the batch, and counts() restart from zero; the routers' state (WRR/TAR counters) carries
    /// over, as in a server. Without a call the whole trace is one batch. Throws kInvalidArgument for an empty
    /// batch, one past total_tokens, or a first_token some layer has not reached exactly.
    void begin_batch(int64_t first_token, int64_t num_tokens);
    /// The counts so far (of the current batch), [L].
    std::vector<LayerCounts> counts() const;
    /// Selections per instance of layer `layer` so far, summed over source GPUs, flat [instances] (experts in id
    /// order, instances in instance_gpus order; adaptation.hpp's instance_offsets).
    std::vector<int64_t> instance_selections(int layer) const;
    /// Replaces layer `layer`'s WRR weights from the next token on, keeping the routing counters
    /// (ReplicaRouter::set_wrr_weights; online adaptation). Throws as that.
    void set_wrr_weights(int layer, const std::vector<std::vector<int>>& weights);
    const ExpertPlan& plan() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// A layer-major copy [L, T, k] of a chunk's ids: the replay of one layer then reads contiguous memory instead of
/// one cache line per token (the [T, L, k] layout's stride), which is what bounds the replay's speed.
class LayerMajorIds {
  public:
    /// Transposes `chunk` using `num_threads` threads (0 = all).
    LayerMajorIds(const RoutingTrace& chunk, int num_threads = 0);
    /// The [T, k] ids of layer l.
    const int32_t* layer(int l) const { return ids_.data() + static_cast<size_t>(l) * num_tokens_ * top_k_; }

  private:
    int64_t num_tokens_;
    int top_k_;
    std::vector<int32_t> ids_;
};

/// Checks that `plan` can be evaluated on `trace`: same E, L and k (the routers use the plan's k), valid plan.
/// Throws kInvalidInput naming both values of the mismatch.
void check_plan_matches_trace(const ExpertPlan& plan, const RoutingTrace& trace);

/// Replays the whole trace. Throws as check_plan_matches_trace.
std::vector<LayerCounts> replay_trace(const RoutingTrace& trace, const ExpertPlan& plan,
                                      const ReplayOptions& options = {});

/// The per-(source GPU, destination GPU) dispatch copy matrix of one layer, for one policy and scheme: what a
/// runtime executing `plan` on `trace` (tokens on their home GPUs, routers starting at zero) must send. Bytes =
/// copies * H * element size. Throws as check_plan_matches_trace, kInvalidArgument for a layer out of range.
TrafficMatrix count_traffic(const RoutingTrace& trace, const ExpertPlan& plan, RoutingPolicy policy, CommScheme scheme,
                            int layer, uint64_t seed = 0);

/// The model dimensions the pricing needs.
struct ModelShape {
    std::string model;     ///< preset name (selects the GEMM table), may be empty
    int hidden = 0;        ///< H
    int intermediate = 0;  ///< I
    int num_experts = 0;   ///< E the model has; 0 = not checked against the trace
    int num_layers = 0;    ///< MoE layers L the model has; 0 = not checked against the trace
};

/// Resolves H and I: the hardware file's overrides, else the model preset `model` (model_config_preset; the
/// trace's metadata names it, so E and L are left unchecked: a trace may hold fewer layers than the model). Throws
/// kInvalidArgument when neither gives them.
ModelShape resolve_model_shape(const HardwareModel& hardware, const std::string& model);

/// The shape of a model the user chose explicitly (--model-config, or a --model preset): H, I, E and L from
/// `config`, named `config.name` (a preset name matches its GEMM table; a config file's path matches by H and I).
/// The hardware file's hidden/intermediate (or --hidden, --intermediate) must agree with it when set: throws
/// kInvalidArgument naming both values otherwise.
ModelShape explicit_model_shape(const HardwareModel& hardware, const ModelConfig& config);

/// Checks an explicit shape against a trace or plan of `num_experts` experts and `num_layers` MoE layers; `what`
/// names the other side ("the trace"). No-op for a shape with E and L unset. Throws kInvalidInput naming both
/// values.
void check_model_shape(const ModelShape& shape, int num_experts, int num_layers, const std::string& what);

/// Metrics of one layer, or totals over layers (spec §7). Times in seconds, per forward pass of the trace as one
/// batch; copies and bytes per direction (dispatch; combine is the same).
struct EvalMetrics {
    int layer = -1;  ///< -1 for the totals
    int64_t cross_node_copies = 0;
    int64_t intra_node_copies = 0;
    int64_t local_selections = 0;  ///< selections served on the home GPU (no copy)
    int64_t cross_node_bytes = 0;
    int64_t intra_node_bytes = 0;
    double cross_node_ratio = 0;  ///< cross / (cross + intra) copies
    double load_std = 0;          ///< population std of GPU loads (totals: mean over layers)
    double balancedness = 0;      ///< mean/max GPU load (totals: mean over layers)
    double imbalance_ratio = 0;   ///< (max-mean)/mean GPU load (totals: mean over layers)
    double dispatch_time_s = 0;
    double combine_time_s = 0;
    double all_to_all_time_s = 0;            ///< dispatch + combine
    double compute_time_s = 0;               ///< max over GPUs of expert compute
    double mean_compute_time_s = 0;          ///< mean over GPUs of expert compute
    double gpu_idle_time_s = 0;              ///< mean over GPUs of (max compute - compute)
    double moe_layer_time_s = 0;             ///< dispatch + max compute + combine
    double non_moe_time_s = 0;               ///< non-MoE time of the busiest GPU (ceil(T/G) tokens)
    double end_to_end_s = 0;                 ///< moe_layer_time_s + non_moe_time_s (totals: the sum over layers)
    std::vector<int64_t> gpu_load;           ///< [G] selections per GPU (totals: summed over layers)
    std::vector<double> gpu_compute_time_s;  ///< [G] (totals: summed)
    std::vector<std::vector<int64_t>> instance_load;  ///< [E][n_e] (layers only)
    std::vector<int64_t> copies;  ///< [G, G] dispatch copy matrix of the scheme (layers only; TrafficMatrix)
};

/// One phase (prefill or decode) of a batched evaluation: its batches priced one by one and summed.
struct PhaseReport {
    BatchPhase phase = BatchPhase::kPrefill;
    int64_t num_batches = 0;
    int64_t num_tokens = 0;
    int64_t min_batch_tokens = 0, max_batch_tokens = 0;
    /// [L] per layer, summed over the phase's batches as EvalReport::layers are (no instance_load or copies).
    std::vector<EvalMetrics> layers;
    EvalMetrics total;  ///< over layers, as EvalReport::total
    /// End-to-end time of one batch (sum over layers of MoE layer time + non-MoE time): min, mean, max.
    double batch_end_to_end_min_s = 0, batch_end_to_end_mean_s = 0, batch_end_to_end_max_s = 0;
};

/// A full evaluation.
struct EvalReport {
    std::string method;  ///< the plan's method
    std::string policy;  ///< routing policy used ("plan" if per-layer policies were kept and differ)
    CommScheme scheme = CommScheme::kFlat;
    Topology topology;
    std::string hardware;       ///< hardware model name
    std::string compute_model;  ///< ComputeModel::source()
    ModelShape shape;
    std::string dataset;
    int64_t num_tokens = 0;  ///< tokens priced (all of the trace, unless a workload leaves a partial round)
    int top_k = 0;
    /// [L]. Batched: each batch priced on its own, then copies, bytes, loads, copy matrices and times summed over
    /// batches; load_std, balancedness and imbalance_ratio are token-weighted means over batches.
    std::vector<EvalMetrics> layers;
    EvalMetrics total;
    BatchSchedule schedule;           ///< how the trace was cut (default: the whole trace, one prefill batch)
    std::vector<PhaseReport> phases;  ///< the phases that have batches, prefill first
};

/// Adds the summable fields of `m` (copies, bytes, times, the per-layer balance measures, and per-GPU load and
/// compute time over the GPUs both hold) to `total`; the totals row of a report is the sum of its layers.
void add_metrics(EvalMetrics& total, const EvalMetrics& m);

/// Prices replay counts under `scheme` (spec §7):
///   flat, flat-dedup: t = max(max_node max(cross bytes out, in) / B_net, max_gpu max(intra out, in) / B_nvl)
///                     + max_gpu(alpha_net * cross messages + alpha_nvl * intra messages);
///   2dh: as flat, but each GPU sends one cross-node message per remote node it reaches (aggregated through the
///        peer) and M-1 intra-node messages more for the aggregation stage;
///   hsc: t = t_cross + t_intra, each bounded the same way on its own links and messages.
/// A message is one non-empty (source, destination) pair; combine mirrors dispatch (same time).
EvalReport price_counts(const std::vector<LayerCounts>& counts, const ExpertPlan& plan, CommScheme scheme,
                        const HardwareModel& hardware, const ModelShape& shape, int64_t num_tokens);

/// Evaluation options.
struct EvalOptions {
    ReplayOptions replay;
    CommScheme scheme = CommScheme::kHsc;
    HardwareModel hardware;           ///< must be set (e.g. load_hardware("a100-testbed"))
    std::optional<ModelShape> shape;  ///< H and I; unset = resolve_model_shape(hardware, trace.model)
    BatchingOptions batching;         ///< how the trace is cut into batches; default: the whole trace, one batch
};

/// The routing label a report carries: the override's name, else the plan's policy, or "plan" when its layers
/// use different policies.
std::string routing_label(const ExpertPlan& plan, const std::optional<RoutingPolicy>& override_policy);

/// Replays and prices, batch by batch as options.batching says (BatchedEval). Throws as check_plan_matches_trace,
/// resolve_model_shape, HardwareModel::validate, make_batch_schedule.
EvalReport evaluate(const RoutingTrace& trace, const ExpertPlan& plan, const EvalOptions& options);

/// Streams a trace through a plan batch by batch (a BatchSchedule), prices every batch on its own under one or
/// more schemes (price_counts) and sums them up. One Replayer: the routers' state carries across batches.
/// Memory is that of the Replayer plus O(L * (G + instances)) per scheme, independent of T and of the batches.
class BatchedEval {
  public:
    /// Throws as Replayer, HardwareModel::validate; kInvalidArgument for no schemes.
    BatchedEval(const ExpertPlan& plan, const BatchSchedule& schedule, std::vector<CommScheme> schemes,
                const HardwareModel& hardware, const ModelShape& shape, const ReplayOptions& replay = {});
    ~BatchedEval();
    BatchedEval(BatchedEval&&) noexcept;
    BatchedEval& operator=(BatchedEval&&) noexcept;

    /// Feeds `chunk` (trace tokens first_token .. first_token + chunk.num_tokens - 1, in order); tokens past
    /// the schedule are ignored. Throws as Replayer::consume.
    void consume(const RoutingTrace& chunk, int64_t first_token);
    /// Whether every scheduled token has been consumed.
    bool done() const;
    /// The report under schemes[i]: method, scheme, topology, shape, tokens, layers, total, schedule and phases
    /// set (dataset and policy left to the caller). Throws kInvalidArgument before done().
    EvalReport report(size_t i = 0) const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// JSON: {"format": "grace.eval/v1", ..., "total": {...}, "layers": [{...}, ...]}.
std::string report_to_json(const EvalReport& report);
/// CSV: one row per layer, then a row "total".
std::string report_to_csv(const EvalReport& report);
/// Writes STEM.json and STEM.csv atomically and together (an OutputSet, the .json last; a trailing .json on
/// `stem` is dropped). Throws kIo naming the file that could not be written; then neither file changed.
void save_report(const EvalReport& report, const std::string& stem);
/// A short fixed-width terminal table of the totals.
std::string format_report_table(const EvalReport& report);

}  // namespace grace
