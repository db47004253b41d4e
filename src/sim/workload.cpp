#include "grace/workload.hpp"

#include <algorithm>
#include <charconv>

#include "grace/error.hpp"

namespace grace {

namespace {

// A decimal field of "SxP+D": digits only (no sign, no spaces), within int64.
int64_t workload_field(const std::string& text, const std::string& field, const char* name) {
    GRACE_CHECK_ARG(!field.empty(), "workload '", text, "' is not SxP+D (e.g. 256x128+16): ", name, " is missing");
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
    GRACE_CHECK_ARG(ec != std::errc::result_out_of_range, "workload '", text, "': ", name, " ", field,
                    " does not fit in 64 bits");
    GRACE_CHECK_ARG(ec == std::errc() && end == field.data() + field.size() && field[0] != '-', "workload '", text,
                    "' is not SxP+D (e.g. 256x128+16): ", name, " '", field, "' is not a whole number");
    return v;
}

}  // namespace

WorkloadSpec parse_workload(const std::string& text) {
    const size_t x = text.find('x'), plus = text.find('+');
    GRACE_CHECK_ARG(x != std::string::npos && plus != std::string::npos && x < plus, "workload '", text,
                    "' is not SxP+D (e.g. 256x128+16)");
    WorkloadSpec w;
    w.sequences = workload_field(text, text.substr(0, x), "S (sequences)");
    w.prefill_tokens = workload_field(text, text.substr(x + 1, plus - x - 1), "P (prefill tokens)");
    w.decode_steps = workload_field(text, text.substr(plus + 1), "D (decode steps)");
    GRACE_CHECK_ARG(w.sequences >= 1, "workload '", text, "': S (sequences) must be >= 1, got ", w.sequences);
    GRACE_CHECK_ARG(w.prefill_tokens >= 1, "workload '", text, "': P (prefill tokens) must be >= 1, got ",
                    w.prefill_tokens);
    int64_t per_sequence = 0, total = 0;
    GRACE_CHECK_ARG(!__builtin_add_overflow(w.prefill_tokens, w.decode_steps, &per_sequence) &&
                        !__builtin_mul_overflow(w.sequences, per_sequence, &total),
                    "workload '", text, "': S*(P+D) tokens do not fit in 64 bits");
    return w;
}

std::string to_string(const WorkloadSpec& w) {
    return std::to_string(w.sequences) + "x" + std::to_string(w.prefill_tokens) + "+" + std::to_string(w.decode_steps);
}

std::vector<WorkloadSpec> paper_workloads() { return {{256, 128, 16}, {512, 64, 32}}; }

std::string to_string(BatchPhase phase) { return phase == BatchPhase::kPrefill ? "prefill" : "decode"; }

int64_t BatchSchedule::num_batches() const {
    int64_t n = 0;
    for (const BatchRun& r : round) n += r.count;
    return n * rounds;
}

BatchSchedule make_batch_schedule(int64_t trace_tokens, const BatchingOptions& options) {
    GRACE_CHECK_ARG(trace_tokens >= 1, "a batch schedule needs at least one token, got ", trace_tokens);
    GRACE_CHECK_ARG(options.batch_tokens >= 0, "--batch-tokens must be >= 1, got ", options.batch_tokens);
    BatchSchedule s;
    s.trace_tokens = trace_tokens;
    s.batch_tokens = options.batch_tokens;
    s.workload = options.workload;
    // `n` tokens of one phase in batches of at most B (the last one shorter).
    auto add_cut = [&](BatchPhase phase, int64_t n) {
        const int64_t b = options.batch_tokens > 0 ? std::min(options.batch_tokens, n) : n;
        if (n / b > 0) s.round.push_back({phase, b, n / b});
        if (n % b > 0) s.round.push_back({phase, n % b, 1});
    };
    if (!options.workload) {
        add_cut(BatchPhase::kPrefill, trace_tokens);
        s.tokens_per_round = trace_tokens;
        return s;
    }
    const WorkloadSpec& w = *options.workload;
    GRACE_CHECK_ARG(w.sequences >= 1 && w.prefill_tokens >= 1 && w.decode_steps >= 0, "workload ", to_string(w),
                    " needs S >= 1, P >= 1 and D >= 0");
    int64_t per_sequence = 0;
    GRACE_CHECK_ARG(!__builtin_add_overflow(w.prefill_tokens, w.decode_steps, &per_sequence) &&
                        !__builtin_mul_overflow(w.sequences, per_sequence, &s.tokens_per_round),
                    "workload ", to_string(w), ": S*(P+D) tokens do not fit in 64 bits");
    GRACE_CHECK_INPUT(s.tokens_per_round <= trace_tokens, "workload ", to_string(w), " needs ", s.tokens_per_round,
                      " tokens but the trace has ", trace_tokens);
    add_cut(BatchPhase::kPrefill, w.sequences * w.prefill_tokens);
    if (w.decode_steps > 0) s.round.push_back({BatchPhase::kDecode, w.sequences, w.decode_steps});
    s.rounds = trace_tokens / s.tokens_per_round;
    return s;
}

}  // namespace grace
