#pragma once
/// @file trace.hpp
/// Routing traces (spec §1): for every token t and MoE layer l, the k distinct expert ids the router chose,
/// in router rank order, and optionally the k gate weights.
///
/// On disk a trace is `NAME.npy` (integer ids, shape [T, L, k], or [T, k] for one layer; any integer dtype,
/// either byte order, C order) with optional metadata `NAME.json` beside it:
/// `{"format": "grace.trace/v1", "num_experts": E, "model": "...", "dataset": "...", "top_k": k,
///   "num_layers": L, "weights": "NAME.weights.npy"}`. The weights file is float [T, L, k] (or [T, k]), finite
/// and non-negative; whenever a trace with weights is read (load_trace, TraceReader) they are checked chunk by
/// chunk with the ids, though no computation uses them (loads and affinity count selections, spec §2).
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
    /// ids in [0, E), no id repeated within one token's top-k at one layer, weights finite, non-negative and
    /// shaped like ids.
    void validate() const;
    /// Tokens [begin, end) of this trace, all layers.
    RoutingTrace slice_tokens(int64_t begin, int64_t end) const;
};

/// Loads `path` (.npy), its metadata and its gate weights, if any. Throws kIo if a file (the weights file too)
/// cannot be read, kInvalidInput for a malformed npy (see read_npy_header), a rank other than 2 or 3, a missing
/// E, or any violation of validate().
RoutingTrace load_trace(const std::string& path, const TraceOverrides& overrides = {});

/// Writes `trace` to `path` (.npy, int32), `path`'s .json metadata and, with weights, `<stem>.weights.npy`.
/// Atomic per file; throws kIo for a missing output folder.
void save_trace(const RoutingTrace& trace, const std::string& path);

/// Checks gate weights [tokens, layers, k] (row-major) of tokens first_token .. first_token + tokens - 1: every
/// value finite and >= 0. Throws kInvalidInput naming `what` (e.g. the file), the value, its token, layer and rank.
void validate_gate_weights(const float* weights, int64_t tokens, int layers, int k, int64_t first_token,
                           const std::string& what);

/// Path of the metadata file beside a trace: "x/trace.npy" -> "x/trace.json".
std::string trace_metadata_path(const std::string& trace_path);

/// Streams a trace file in chunks of tokens without holding it in memory (for traces larger than RAM).
/// Each chunk is validated as load_trace would validate it.
class TraceReader {
  public:
    /// Opens the trace, reads its metadata and opens its gate weights file, if any; throws as load_trace does
    /// (before reading any token): kIo for a missing weights file, kInvalidInput for weights that are not floats
    /// or not shaped like the ids.
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
    /// Whether the trace has gate weights (metadata "weights" or TraceOverrides::weights_path), and their file.
    bool has_weights() const;
    const std::string& weights_path() const;
    /// Reads the next up-to-`max_tokens` tokens into `chunk` (a trace of that many tokens; with their gate
    /// weights only after set_keep_weights(true)); returns false at the end. Gate weights are always read and
    /// checked (validate_gate_weights) in blocks of bounded size; ids unless set_validation(false). `first_token` receives the index of the chunk's first
    /// token. May be called from another thread than the previous call (not concurrently), e.g. to read ahead.
    bool next(int64_t max_tokens, RoutingTrace& chunk, int64_t* first_token = nullptr);
    /// Turns the id checks of next() off, for a caller that checks every id itself while consuming it (the
    /// profiler fuses the check into counting). On by default.
    void set_validation(bool enabled);
    /// Whether next() puts the gate weights into its chunks (off by default: no computation uses them, and a
    /// chunk's weights cost as much memory as its ids). load_trace turns it on.
    void set_keep_weights(bool keep);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace grace
