#pragma once
/// @file trace.hpp
/// Routing traces (spec §1): for every token t and MoE layer l, the k distinct expert ids the router chose,
/// in router rank order, and optionally the k gate weights.
///
/// On disk a trace is `NAME.npy` (integer ids, shape [T, L, k], or [T, k] for one layer; any integer dtype,
/// either byte order, C order) with optional metadata `NAME.json` beside it:
/// `{"format": "grace.trace/v1", "num_experts": E, "model": "...", "dataset": "...", "top_k": k,
///   "num_layers": L, "weights": "NAME.weights.npy"}`. The weights file is float [T, L, k] (or [T, k]).
/// Flags (TraceOverrides) take precedence over the metadata file.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace grace {

/// What a caller can say about a trace that its file may not (CLI: --experts, --model, --dataset, --weights).
struct TraceOverrides {
    std::optional<int> num_experts;  ///< E; required if the metadata file does not give it
    std::optional<std::string> model;
    std::optional<std::string> dataset;
    std::optional<std::string> weights_path;  ///< gate weights .npy, overriding the metadata's
};

/// An in-memory routing trace.
struct RoutingTrace {
    int64_t num_tokens = 0;           ///< T
    int num_layers = 0;               ///< L
    int top_k = 0;                    ///< k
    int num_experts = 0;              ///< E
    std::string model;                ///< free text, e.g. "olmoe"
    std::string dataset;              ///< free text, e.g. "wikitext"
    std::vector<int32_t> expert_ids;  ///< [T, L, k], row-major
    std::vector<float> gate_weights;  ///< [T, L, k] or empty

    /// Expert id of selection j of token t at layer l.
    int32_t id(int64_t t, int l, int j) const { return expert_ids[(t * num_layers + l) * top_k + j]; }
    /// Pointer to the k ids of token t at layer l.
    const int32_t* ids(int64_t t, int l) const { return expert_ids.data() + (t * num_layers + l) * top_k; }
    bool has_weights() const { return !gate_weights.empty(); }

    /// Checks the invariants and throws kInvalidInput naming the first violation: T >= 1, 1 <= k <= E,
    /// ids in [0, E), no id repeated within one token's top-k at one layer, weights finite and shaped like ids.
    void validate() const;
    /// Tokens [begin, end) of this trace, all layers.
    RoutingTrace slice_tokens(int64_t begin, int64_t end) const;
};

/// Loads `path` (.npy) and its metadata. Throws kIo if a file cannot be read, kInvalidInput for a malformed
/// npy (see read_npy_header), a rank other than 2 or 3, a missing E, or any violation of validate().
RoutingTrace load_trace(const std::string& path, const TraceOverrides& overrides = {});

/// Writes `trace` to `path` (.npy, int32), `path`'s .json metadata and, with weights, `<stem>.weights.npy`.
/// Atomic per file; throws kIo for a missing output folder.
void save_trace(const RoutingTrace& trace, const std::string& path);

/// Path of the metadata file beside a trace: "x/trace.npy" -> "x/trace.json".
std::string trace_metadata_path(const std::string& trace_path);

/// Streams a trace file in chunks of tokens without holding it in memory (for traces larger than RAM).
/// Each chunk is validated as load_trace would validate it.
class TraceReader {
  public:
    /// Opens the trace and reads its metadata; throws as load_trace does (before reading any token).
    TraceReader(const std::string& path, const TraceOverrides& overrides = {});
    ~TraceReader();
    TraceReader(TraceReader&&) noexcept;
    TraceReader& operator=(TraceReader&&) noexcept;

    int64_t num_tokens() const;
    int num_layers() const;
    int top_k() const;
    int num_experts() const;
    const std::string& model() const;
    const std::string& dataset() const;
    /// Reads the next up-to-`max_tokens` tokens into `chunk` (a trace of that many tokens, no weights);
    /// returns false at the end. `first_token` receives the index of the chunk's first token. May be called
    /// from another thread than the previous call (not concurrently), e.g. to read ahead.
    bool next(int64_t max_tokens, RoutingTrace& chunk, int64_t* first_token = nullptr);
    /// Turns the id checks of next() off, for a caller that checks every id itself while consuming it (the
    /// profiler fuses the check into counting). On by default.
    void set_validation(bool enabled);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace grace
