// BatchedEval: a trace priced batch by batch (include/grace/workload.hpp for how the trace is cut).
#include <algorithm>
#include <limits>

#include "grace/error.hpp"
#include "grace/eval.hpp"

namespace grace {

namespace {

// Adds one batch's metrics of a layer to a running sum over batches. Counts and times add up; load_std,
// balancedness and imbalance_ratio become the token-weighted mean over the batches so far (an incremental mean,
// so that a single batch keeps its value exactly). `tokens_so_far` includes this batch's `tokens`.
void add_batch(EvalMetrics& acc, const EvalMetrics& m, int64_t tokens, int64_t tokens_so_far, bool details) {
    acc.layer = m.layer;
    acc.cross_node_copies += m.cross_node_copies;
    acc.intra_node_copies += m.intra_node_copies;
    acc.local_selections += m.local_selections;
    acc.cross_node_bytes += m.cross_node_bytes;
    acc.intra_node_bytes += m.intra_node_bytes;
    const double w = static_cast<double>(tokens) / static_cast<double>(tokens_so_far);
    acc.load_std += (m.load_std - acc.load_std) * w;
    acc.balancedness += (m.balancedness - acc.balancedness) * w;
    acc.imbalance_ratio += (m.imbalance_ratio - acc.imbalance_ratio) * w;
    acc.dispatch_time_s += m.dispatch_time_s;
    acc.combine_time_s += m.combine_time_s;
    acc.all_to_all_time_s += m.all_to_all_time_s;
    acc.compute_time_s += m.compute_time_s;
    acc.mean_compute_time_s += m.mean_compute_time_s;
    acc.gpu_idle_time_s += m.gpu_idle_time_s;
    acc.moe_layer_time_s += m.moe_layer_time_s;
    acc.non_moe_time_s += m.non_moe_time_s;
    acc.end_to_end_s += m.end_to_end_s;
    acc.gpu_load.resize(m.gpu_load.size(), 0);
    acc.gpu_compute_time_s.resize(m.gpu_compute_time_s.size(), 0);
    for (size_t g = 0; g < m.gpu_load.size(); ++g) acc.gpu_load[g] += m.gpu_load[g];
    for (size_t g = 0; g < m.gpu_compute_time_s.size(); ++g) acc.gpu_compute_time_s[g] += m.gpu_compute_time_s[g];
    if (!details) return;
    acc.instance_load.resize(m.instance_load.size());
    for (size_t e = 0; e < m.instance_load.size(); ++e) {
        acc.instance_load[e].resize(m.instance_load[e].size(), 0);
        for (size_t i = 0; i < m.instance_load[e].size(); ++i) acc.instance_load[e][i] += m.instance_load[e][i];
    }
    acc.copies.resize(m.copies.size(), 0);
    for (size_t i = 0; i < m.copies.size(); ++i) acc.copies[i] += m.copies[i];
}

double ratio(int64_t cross, int64_t intra) {
    const int64_t all = cross + intra;
    return all > 0 ? static_cast<double>(cross) / static_cast<double>(all) : 0;
}

// The totals over layers, in price_counts' order of operations (so one batch gives price_counts' totals).
EvalMetrics sum_layers(std::vector<EvalMetrics>& layers, int num_gpus) {
    EvalMetrics tot;
    tot.gpu_load.assign(num_gpus, 0);
    tot.gpu_compute_time_s.assign(num_gpus, 0);
    for (EvalMetrics& m : layers) {
        m.cross_node_ratio = ratio(m.cross_node_copies, m.intra_node_copies);
        add_metrics(tot, m);
    }
    const double L = static_cast<double>(std::max<size_t>(layers.size(), 1));
    tot.load_std /= L;
    tot.balancedness /= L;
    tot.imbalance_ratio /= L;
    tot.cross_node_ratio = ratio(tot.cross_node_copies, tot.intra_node_copies);
    return tot;
}

// The running sums of one scheme: the whole evaluation and each phase.
struct SchemeSums {
    EvalReport header;  // the first batch's report, for its run description
    bool priced = false;
    int64_t tokens = 0;
    std::vector<EvalMetrics> layers;
    PhaseReport phases[2];
    double batch_e2e_sum[2] = {0, 0};
};

}  // namespace

struct BatchedEval::Impl {
    BatchSchedule schedule;
    std::vector<CommScheme> schemes;
    HardwareModel hardware;
    ModelShape shape;
    Replayer replayer;
    std::vector<SchemeSums> sums;
    // Where the replay is: token `next`, inside batch [batch_begin, batch_begin + batch_size) of run `run`
    // (its batch `in_run`) of round `round`; `started`: begin_batch was called for it.
    int64_t next = 0, batch_begin = 0, round = 0, in_run = 0;
    size_t run = 0;
    bool started = false;

    Impl(const ExpertPlan& plan, const BatchSchedule& s, std::vector<CommScheme> sc, const HardwareModel& hw,
         const ModelShape& sh, const ReplayOptions& replay)
        : schedule(s), schemes(std::move(sc)), hardware(hw), shape(sh), replayer(plan, s.trace_tokens, replay) {}

    bool done() const { return round >= schedule.rounds; }
    const BatchRun& current() const { return schedule.round[run]; }

    void finish_batch() {
        const BatchRun& br = current();
        const int64_t n = br.batch_tokens;
        const std::vector<LayerCounts> counts = replayer.counts();
        const ExpertPlan& plan = replayer.plan();
        const int p = br.phase == BatchPhase::kPrefill ? 0 : 1;
        for (size_t i = 0; i < schemes.size(); ++i) {
            EvalReport r = price_counts(counts, plan, schemes[i], hardware, shape, n);
            SchemeSums& s = sums[i];
            if (!s.priced) {
                s.layers.resize(r.layers.size());
                for (auto& ph : s.phases) ph.layers.resize(r.layers.size());
                s.priced = true;
            }
            PhaseReport& ph = s.phases[p];
            s.tokens += n;
            ph.num_tokens += n;
            ++ph.num_batches;
            ph.min_batch_tokens = ph.num_batches == 1 ? n : std::min(ph.min_batch_tokens, n);
            ph.max_batch_tokens = std::max(ph.max_batch_tokens, n);
            for (size_t l = 0; l < r.layers.size(); ++l) {
                add_batch(s.layers[l], r.layers[l], n, s.tokens, true);
                add_batch(ph.layers[l], r.layers[l], n, ph.num_tokens, false);
            }
            const double e2e = r.total.end_to_end_s;
            ph.batch_end_to_end_min_s = ph.num_batches == 1 ? e2e : std::min(ph.batch_end_to_end_min_s, e2e);
            ph.batch_end_to_end_max_s = std::max(ph.batch_end_to_end_max_s, e2e);
            s.batch_e2e_sum[p] += e2e;
            if (s.header.top_k == 0) {
                r.layers.clear();
                s.header = std::move(r);
            }
        }
        // The next batch of the schedule.
        started = false;
        batch_begin += n;
        if (++in_run == br.count) {
            in_run = 0;
            if (++run == schedule.round.size()) run = 0, ++round;
        }
    }
};

BatchedEval::BatchedEval(const ExpertPlan& plan, const BatchSchedule& schedule, std::vector<CommScheme> schemes,
                         const HardwareModel& hardware, const ModelShape& shape, const ReplayOptions& replay) {
    GRACE_CHECK_ARG(!schemes.empty(), "a batched evaluation needs at least one communication scheme");
    GRACE_CHECK_ARG(!schedule.round.empty() && schedule.rounds >= 1 && schedule.num_tokens() <= schedule.trace_tokens,
                    "the batch schedule covers ", schedule.num_tokens(), " tokens of a trace of ",
                    schedule.trace_tokens);
    hardware.validate();
    impl_ = std::make_unique<Impl>(plan, schedule, std::move(schemes), hardware, shape, replay);
    impl_->sums.resize(impl_->schemes.size());
}

BatchedEval::~BatchedEval() = default;
BatchedEval::BatchedEval(BatchedEval&&) noexcept = default;
BatchedEval& BatchedEval::operator=(BatchedEval&&) noexcept = default;

bool BatchedEval::done() const { return impl_->done(); }

void BatchedEval::consume(const RoutingTrace& chunk, int64_t first_token) {
    Impl& s = *impl_;
    if (s.done()) return;
    GRACE_CHECK_ARG(first_token == s.next, "expected token ", s.next, " next, got a chunk from token ", first_token);
    int64_t offset = 0;
    while (!s.done() && offset < chunk.num_tokens) {
        const int64_t size = s.current().batch_tokens;
        if (!s.started) {
            s.replayer.begin_batch(s.batch_begin, size);
            s.started = true;
        }
        const int64_t m = std::min(chunk.num_tokens - offset, s.batch_begin + size - s.next);
        s.replayer.consume_range(chunk, first_token, offset, m);
        s.next += m;
        offset += m;
        if (s.next == s.batch_begin + size) s.finish_batch();
    }
    // Tokens past the schedule are not replayed: the next chunk starts where this one ended.
    if (s.done()) s.next = first_token + chunk.num_tokens;
}

EvalReport BatchedEval::report(size_t i) const {
    const Impl& s = *impl_;
    GRACE_CHECK_ARG(s.done(), "the batched evaluation has consumed ", s.next, " of its ", s.schedule.num_tokens(),
                    " tokens");
    GRACE_CHECK_ARG(i < s.sums.size(), "scheme ", i, " is outside the ", s.sums.size(), " evaluated");
    const SchemeSums& sums = s.sums[i];
    const int G = s.replayer.plan().topology.num_gpus();
    EvalReport r = sums.header;
    r.num_tokens = sums.tokens;
    r.layers = sums.layers;
    r.total = sum_layers(r.layers, G);
    r.schedule = s.schedule;
    for (int p = 0; p < 2; ++p) {
        PhaseReport ph = sums.phases[p];
        if (ph.num_batches == 0) continue;
        ph.phase = p == 0 ? BatchPhase::kPrefill : BatchPhase::kDecode;
        ph.total = sum_layers(ph.layers, G);
        ph.batch_end_to_end_mean_s = sums.batch_e2e_sum[p] / static_cast<double>(ph.num_batches);
        r.phases.push_back(std::move(ph));
    }
    return r;
}

}  // namespace grace
