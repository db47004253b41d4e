#pragma once
/// @file workload.hpp
/// How the evaluator cuts a trace into forward passes (batches): the whole trace as one prefill batch (the
/// default), consecutive batches of B tokens (`--batch-tokens B`), or a serving workload of S sequences x P
/// prefill tokens + D decode steps (`--workload SxP+D`, the paper's 256x128+16 and 512x64+32).
///
/// Workload layout, in trace order (docs/eval.md): a round takes the next S*(P+D) tokens of the trace; its first
/// S*P tokens are the prefill (sequence s's prompt is tokens s*P .. s*P+P-1 of the round), cut into batches of at
/// most B tokens when --batch-tokens is given, else one batch; then D decode batches of S tokens (decode step d's
/// batch is tokens S*P + d*S .. S*P + d*S + S-1 of the round; its token s is sequence s's new token). The trace
/// holds as many whole rounds as fit; tokens after the last whole round are not priced.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace grace {

/// S sequences x P prefill tokens + D decode steps.
struct WorkloadSpec {
    int64_t sequences = 0;       ///< S >= 1
    int64_t prefill_tokens = 0;  ///< P >= 1 per sequence
    int64_t decode_steps = 0;    ///< D >= 0; one new token per sequence per step

    /// S * (P + D). Never overflows for a parsed spec (parse_workload checks it).
    int64_t tokens_per_round() const { return sequences * (prefill_tokens + decode_steps); }
};

/// Parses "SxP+D" (decimal integers, S >= 1, P >= 1, D >= 0, S*(P+D) within 64 bits). Throws kInvalidArgument
/// naming the text and what is wrong with it.
WorkloadSpec parse_workload(const std::string& text);
/// "SxP+D".
std::string to_string(const WorkloadSpec& spec);
/// The paper's two workloads: 256x128+16 and 512x64+32.
std::vector<WorkloadSpec> paper_workloads();

/// The phase a batch belongs to.
enum class BatchPhase { kPrefill, kDecode };
/// "prefill", "decode".
std::string to_string(BatchPhase phase);

/// How to cut the trace into batches.
struct BatchingOptions {
    /// B: batches of at most B tokens (the last one of a run shorter); 0 = no limit (the whole trace, or a
    /// workload round's whole prefill, is one batch). With a workload it splits the prefill only.
    int64_t batch_tokens = 0;
    std::optional<WorkloadSpec> workload;  ///< unset = every batch is prefill, over the whole trace
};

/// `count` consecutive batches of `batch_tokens` tokens each, all of one phase.
struct BatchRun {
    BatchPhase phase = BatchPhase::kPrefill;
    int64_t batch_tokens = 0;  ///< >= 1
    int64_t count = 0;         ///< >= 1
};

/// The batches of an evaluation, in trace order: `round` repeated `rounds` times from token 0.
struct BatchSchedule {
    std::vector<BatchRun> round;   ///< one round's batches
    int64_t rounds = 1;            ///< >= 1
    int64_t tokens_per_round = 0;  ///< sum of batch_tokens * count over `round`
    std::optional<WorkloadSpec> workload;
    int64_t batch_tokens = 0;  ///< BatchingOptions::batch_tokens
    int64_t trace_tokens = 0;  ///< tokens of the trace

    /// Tokens priced: rounds * tokens_per_round (<= trace_tokens).
    int64_t num_tokens() const { return rounds * tokens_per_round; }
    /// Batches in all rounds.
    int64_t num_batches() const;
    /// Whether the schedule is the whole trace as one prefill batch (the evaluator's classic setting).
    bool whole_trace() const { return !workload && rounds == 1 && round.size() == 1 && round[0].count == 1; }
};

/// The schedule for a trace of `trace_tokens` tokens. Throws kInvalidArgument for batch_tokens < 0 or
/// trace_tokens < 1, and kInvalidInput, naming both numbers, when a workload needs more tokens than the trace has.
BatchSchedule make_batch_schedule(int64_t trace_tokens, const BatchingOptions& options);

}  // namespace grace
