#include "grace/trace.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/json_read.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/npy.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace grace {

namespace {

constexpr int kMaxTopK = 64;

std::string stem_path(const std::string& trace_path) {
    fs::path p(trace_path);
    if (p.extension() == ".npy") p.replace_extension();
    return p.string();
}

// Checks one chunk's ids: range and distinctness within each (token, layer). `first_token` only labels errors.
// The scan runs in parallel; the first bad token (in order) is then re-checked serially for its message, so the
// error does not depend on the thread count.
bool row_ok(const int32_t* row, int k, int num_experts) {
    for (int j = 0; j < k; ++j) {
        if (static_cast<uint32_t>(row[j]) >= static_cast<uint32_t>(num_experts)) return false;
        for (int i = 0; i < j; ++i)
            if (row[i] == row[j]) return false;
    }
    return true;
}

void report_bad_token(const int32_t* ids, int layers, int k, int num_experts, int64_t token) {
    for (int l = 0; l < layers; ++l) {
        const int32_t* row = ids + l * k;
        for (int j = 0; j < k; ++j) {
            int32_t e = row[j];
            GRACE_CHECK_INPUT(e >= 0 && e < num_experts, "expert id ", e, " at token ", token, ", layer ", l,
                              " is out of range [0, ", num_experts, ")");
            for (int i = 0; i < j; ++i)
                GRACE_CHECK_INPUT(row[i] != e, "expert id ", e, " is repeated in the top-k of token ", token,
                                  ", layer ", l);
        }
    }
}

void validate_ids(const int32_t* ids, int64_t tokens, int layers, int k, int num_experts, int64_t first_token) {
    const int64_t row = static_cast<int64_t>(layers) * k;
    int64_t first_bad = tokens;
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (tokens * row > (1 << 18))
    for (int64_t t = 0; t < tokens; ++t) {
        for (int l = 0; l < layers; ++l)
            if (!row_ok(ids + t * row + l * k, k, num_experts)) {
                first_bad = std::min(first_bad, t);
                break;
            }
    }
    if (first_bad < tokens) report_bad_token(ids + first_bad * row, layers, k, num_experts, first_token + first_bad);
}

struct Metadata {
    int num_experts = 0;
    std::string experts_from;  // where num_experts came from, for messages: "--experts" or the metadata file
    // Optional shape fields of the metadata, checked against the id array (they must not contradict it).
    std::optional<int64_t> num_tokens, num_layers, top_k;
    std::string path;  // the metadata file, if there is one
    std::string model, dataset, weights_path;
};

Metadata read_metadata(const std::string& trace_path, const TraceOverrides& overrides) {
    Metadata m;
    std::string meta_path = trace_metadata_path(trace_path);
    std::error_code ec;
    if (fs::exists(meta_path, ec)) {
        json j;
        try {
            j = json::parse(read_text(meta_path));
        } catch (const json::exception& e) {
            GRACE_CHECK_INPUT(false, meta_path, ": not valid JSON (", e.what(), ")");
        }
        GRACE_CHECK_INPUT(j.is_object(), meta_path, ": trace metadata must be a JSON object");
        m.path = meta_path;
        // Integers through detail::json_int: 64-bit, range-checked, errors name the field (nothing wraps).
        if (j.contains("num_experts")) {
            m.num_experts = detail::json_int(j.at("num_experts"), meta_path, "num_experts", 1, detail::kInt32Max);
            m.experts_from = "num_experts in " + meta_path;
        }
        auto optional_count = [&](const char* key, int64_t hi) -> std::optional<int64_t> {
            if (!j.contains(key) || j.at(key).is_null()) return std::nullopt;
            return detail::json_int<int64_t>(j.at(key), meta_path, key, 0, hi);
        };
        m.num_tokens = optional_count("num_tokens", std::numeric_limits<int64_t>::max());
        m.num_layers = optional_count("num_layers", detail::kInt32Max);
        m.top_k = optional_count("top_k", detail::kInt32Max);
        try {
            if (j.contains("model")) m.model = j.at("model").get<std::string>();
            if (j.contains("dataset")) m.dataset = j.at("dataset").get<std::string>();
            if (j.contains("weights") && !j.at("weights").is_null()) {
                fs::path w = j.at("weights").get<std::string>();
                if (w.is_relative()) w = fs::path(trace_path).parent_path() / w;
                m.weights_path = w.string();
            }
        } catch (const json::exception& e) {
            GRACE_CHECK_INPUT(false, meta_path, ": bad field type (", e.what(), ")");
        }
    }
    if (overrides.num_experts) {
        m.num_experts = *overrides.num_experts;
        m.experts_from = "--experts";
    }
    if (overrides.model) m.model = *overrides.model;
    if (overrides.dataset) m.dataset = *overrides.dataset;
    if (overrides.weights_path) m.weights_path = *overrides.weights_path;
    GRACE_CHECK_INPUT(m.num_experts > 0, trace_path,
                      ": number of experts unknown: give --experts E or \"num_experts\" in ", meta_path);
    return m;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Interprets the id array's shape as [T, L, k] or [T, k].
void trace_shape(const NpyHeader& h, const std::string& path, int64_t& tokens, int& layers, int& k) {
    GRACE_CHECK_INPUT(h.is_integer() && h.dtype != DType::kBool, path, ": expert ids must be integers, got ",
                      h.dtype_name());
    GRACE_CHECK_INPUT(h.shape.size() == 2 || h.shape.size() == 3, path, ": expected shape [tokens, layers, top_k] or ",
                      "[tokens, top_k], got rank ", h.shape.size());
    tokens = h.shape[0];
    const int64_t L = h.shape.size() == 3 ? h.shape[1] : 1, K = h.shape.back();
    GRACE_CHECK_INPUT(tokens >= 1, path, ": empty trace (0 tokens)");
    GRACE_CHECK_INPUT(L >= 1, path, ": trace has 0 layers");
    GRACE_CHECK_INPUT(L <= detail::kInt32Max, path, ": ", L, " layers (shape ", shape_text(h.shape), ") exceed ",
                      detail::kInt32Max);
    GRACE_CHECK_INPUT(K >= 1 && K <= kMaxTopK, path, ": top_k = ", K, " is out of range [1, ", kMaxTopK, "]");
    layers = static_cast<int>(L);
    k = static_cast<int>(K);
}

// The metadata's shape fields must agree with the id array (a stale .json beside a new .npy is caught here).
void check_metadata_shape(const Metadata& m, const NpyHeader& h, const std::string& path, int64_t tokens, int layers,
                          int k) {
    auto agree = [&](const std::optional<int64_t>& field, const char* name, int64_t actual, const char* dim) {
        GRACE_CHECK_INPUT(!field || *field == actual, m.path, ": ", name, " = ", *field, " contradicts ", path,
                          " of shape ", shape_text(h.shape), " (", dim, " = ", actual, ")");
    };
    agree(m.num_tokens, "num_tokens", tokens, "tokens");
    agree(m.num_layers, "num_layers", layers, "layers");
    agree(m.top_k, "top_k", k, "top_k");
}

}  // namespace

std::string trace_metadata_path(const std::string& trace_path) { return stem_path(trace_path) + ".json"; }

void RoutingTrace::validate() const {
    GRACE_CHECK_INPUT(num_tokens >= 1, "empty trace (0 tokens)");
    GRACE_CHECK_INPUT(num_layers >= 1, "trace has ", num_layers, " layers");
    GRACE_CHECK_INPUT(top_k >= 1, "top_k = ", top_k, " must be at least 1");
    GRACE_CHECK_INPUT(top_k <= num_experts, "top_k = ", top_k, " exceeds the number of experts E = ", num_experts);
    const int64_t n = num_tokens * num_layers * top_k;
    GRACE_CHECK_INPUT(static_cast<int64_t>(expert_ids.size()) == n, "trace holds ", expert_ids.size(),
                      " ids but [T, L, k] = [", num_tokens, ", ", num_layers, ", ", top_k, "] needs ", n);
    validate_ids(expert_ids.data(), num_tokens, num_layers, top_k, num_experts, 0);
    if (!gate_weights.empty()) {
        GRACE_CHECK_INPUT(static_cast<int64_t>(gate_weights.size()) == n, "gate weights hold ", gate_weights.size(),
                          " values but the ids' shape [", num_tokens, ", ", num_layers, ", ", top_k, "] needs ", n);
        validate_gate_weights(gate_weights.data(), num_tokens, num_layers, top_k, 0, "trace");
    }
}

RoutingTrace RoutingTrace::slice_tokens(int64_t begin, int64_t end) const {
    GRACE_CHECK_ARG(0 <= begin && begin <= end && end <= num_tokens, "token range [", begin, ", ", end,
                    ") is outside [0, ", num_tokens, ")");
    RoutingTrace out = *this;
    const int64_t row = static_cast<int64_t>(num_layers) * top_k;
    out.num_tokens = end - begin;
    out.expert_ids.assign(expert_ids.begin() + begin * row, expert_ids.begin() + end * row);
    if (has_weights()) out.gate_weights.assign(gate_weights.begin() + begin * row, gate_weights.begin() + end * row);
    return out;
}

RoutingTrace load_trace(const std::string& path, const TraceOverrides& overrides) {
    TraceReader reader(path, overrides);
    reader.set_keep_weights(true);
    RoutingTrace trace;
    reader.next(reader.num_tokens(), trace);  // ids and gate weights, both checked
    return trace;
}

void save_trace(const RoutingTrace& trace, const std::string& path) {
    trace.validate();
    const std::string wpath = stem_path(path) + ".weights.npy";
    const std::string meta_path = trace_metadata_path(path);
    // Check every target before writing anything, so that a bad one (e.g. a folder) leaves no new file.
    check_output_file(path);
    check_output_file(meta_path);
    if (trace.has_weights()) check_output_file(wpath);
    json meta = {{"format", "grace.trace/v1"},     {"num_experts", trace.num_experts},
                 {"num_layers", trace.num_layers}, {"top_k", trace.top_k},
                 {"num_tokens", trace.num_tokens}, {"model", trace.model},
                 {"dataset", trace.dataset},       {"weights", nullptr}};
    const std::vector<int64_t> shape = {trace.num_tokens, trace.num_layers, trace.top_k};
    // Ids, weights and metadata are one output: staged together, the metadata (naming the weights) renamed last.
    OutputSet out;
    if (trace.has_weights()) {
        out.add(wpath, [&](const std::string& tmp) { write_npy(tmp, trace.gate_weights, shape); });
        meta["weights"] = fs::path(wpath).filename().string();
    }
    out.add(path, [&](const std::string& tmp) { write_npy(tmp, trace.expert_ids, shape); });
    out.add_text(meta_path, meta.dump(2) + "\n");
    out.commit();
}

// Gate weights (spec §1, docs/formats.md): float, shaped like the ids, finite and non-negative (a router's gate
// weights are softmax or sigmoid scores). Nothing in profiling, planning or evaluation uses them (spec §2 counts
// selections), but every reader checks them, chunk by chunk, so a bad file fails instead of passing silently.

void validate_gate_weights(const float* weights, int64_t tokens, int layers, int k, int64_t first_token,
                           const std::string& what) {
    const int64_t row = static_cast<int64_t>(layers) * k;
    int64_t first_bad = tokens * row;
    // Serial for the reader's blocks (which may run beside the profiler's parallel counting), parallel above.
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (tokens * row > (1 << 22))
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = t * row; i < (t + 1) * row; ++i)
            if (!(std::isfinite(weights[i]) && weights[i] >= 0)) {
                first_bad = std::min(first_bad, i);
                break;
            }
    if (first_bad == tokens * row) return;
    const float w = weights[first_bad];
    GRACE_CHECK_INPUT(false, what, ": gate weight ", w, " at token ", first_token + first_bad / row, ", layer ",
                      (first_bad / k) % layers, ", rank ", first_bad % k, " is ",
                      std::isfinite(w) ? "negative" : "not finite");
}

namespace {

// Gate weights of a trace, read beside its ids in blocks of a bounded size, so that memory stays small when the
// caller does not keep them. Native-order float32 (what grace and the recorder write) is read as is; any other
// float dtype goes through NpyRowReader's conversion.
class GateWeightStream {
  public:
    // Opens and checks the header: float dtype, shape [tokens, layers, k] (or [tokens, k] for one layer).
    GateWeightStream(const std::string& trace_path, const std::string& weights_path, int64_t tokens, int layers, int k)
        : path_(weights_path), layers_(layers), k_(k) {
        try {
            reader_ = std::make_unique<NpyRowReader>(weights_path);
        } catch (const Error& e) {
            throw Error(e.code(), trace_path + ": gate weights: " + e.what());
        }
        const NpyHeader& h = reader_->header();
        GRACE_CHECK_INPUT(h.is_float(), weights_path, ": gate weights must be floats, got ", h.dtype_name());
        const std::vector<int64_t>& s = h.shape;
        const bool ok = (s.size() == 3 && s[0] == tokens && s[1] == layers && s[2] == k) ||
                        (s.size() == 2 && layers == 1 && s[0] == tokens && s[1] == k);
        std::string shape;
        for (int64_t d : s) {
            if (!shape.empty()) shape += ", ";
            shape += std::to_string(d);
        }
        GRACE_CHECK_INPUT(ok, weights_path, ": gate weights have shape [", shape, "] but the ids of ", trace_path,
                          " have [", tokens, ", ", layers, ", ", k, "]");
        if (h.dtype == DType::kFloat32 && h.big_endian == (std::endian::native == std::endian::big)) {
            const long offset = static_cast<long>(h.data_offset);
            reader_.reset();
            raw_ = std::fopen(weights_path.c_str(), "rb");
            GRACE_CHECK(raw_ != nullptr, ErrorCode::kIo, "cannot open ", weights_path);
            GRACE_CHECK(std::fseek(raw_, offset, SEEK_SET) == 0, ErrorCode::kIo, "cannot seek in ", weights_path);
        }
    }
    ~GateWeightStream() {
        if (raw_) std::fclose(raw_);
    }
    GateWeightStream(const GateWeightStream&) = delete;
    GateWeightStream& operator=(const GateWeightStream&) = delete;

    // Reads and checks the weights of the next `tokens` tokens (first_token labels errors); appends them to `out`
    // when given.
    void read(int64_t tokens, int64_t first_token, std::vector<float>* out) {
        constexpr int64_t kBlockTokens = 4096;
        const int64_t row = static_cast<int64_t>(layers_) * k_;
        if (out) {
            out->clear();
            out->reserve(static_cast<size_t>(tokens * row));
        }
        for (int64_t done = 0; done < tokens;) {
            const int64_t want = std::min(kBlockTokens, tokens - done);
            int64_t got = 0;
            if (raw_) {
                block_.resize(static_cast<size_t>(want * row));
                got = static_cast<int64_t>(std::fread(block_.data(), sizeof(float) * row, want, raw_));
            } else {
                got = reader_->read_float(want, wide_);
                block_.assign(wide_.begin(), wide_.begin() + got * row);  // checked as float, the type kept
            }
            GRACE_CHECK(got == want, ErrorCode::kIo, path_, ": read ", got, " rows of gate weights at token ",
                        first_token + done, ", expected ", want);
            validate_gate_weights(block_.data(), got, layers_, k_, first_token + done, path_);
            if (out) out->insert(out->end(), block_.begin(), block_.end());
            done += got;
        }
    }

  private:
    std::string path_;
    int layers_, k_;
    std::unique_ptr<NpyRowReader> reader_;
    std::FILE* raw_ = nullptr;
    std::vector<double> wide_;
    std::vector<float> block_;
};

}  // namespace

struct TraceReader::Impl {
    std::string path;
    std::unique_ptr<NpyRowReader> reader;
    std::unique_ptr<GateWeightStream> weights;  // null when the trace has none
    bool keep_weights = false;
    Metadata meta;
    int64_t tokens = 0;
    int layers = 0, k = 0;
    int64_t next_token = 0;
    bool validate = true;
};

TraceReader::TraceReader(const std::string& path, const TraceOverrides& overrides) : impl_(std::make_unique<Impl>()) {
    impl_->path = path;
    impl_->reader = std::make_unique<NpyRowReader>(path);
    trace_shape(impl_->reader->header(), path, impl_->tokens, impl_->layers, impl_->k);
    impl_->meta = read_metadata(path, overrides);
    check_metadata_shape(impl_->meta, impl_->reader->header(), path, impl_->tokens, impl_->layers, impl_->k);
    GRACE_CHECK_INPUT(impl_->k <= impl_->meta.num_experts, path, ": top_k = ", impl_->k,
                      " exceeds the number of experts E = ", impl_->meta.num_experts, " (", impl_->meta.experts_from,
                      ")");
    if (!impl_->meta.weights_path.empty())
        impl_->weights =
            std::make_unique<GateWeightStream>(path, impl_->meta.weights_path, impl_->tokens, impl_->layers, impl_->k);
}

TraceReader::~TraceReader() = default;
TraceReader::TraceReader(TraceReader&&) noexcept = default;
TraceReader& TraceReader::operator=(TraceReader&&) noexcept = default;

int64_t TraceReader::num_tokens() const { return impl_->tokens; }
int TraceReader::num_layers() const { return impl_->layers; }
int TraceReader::top_k() const { return impl_->k; }
int TraceReader::num_experts() const { return impl_->meta.num_experts; }
const std::string& TraceReader::model() const { return impl_->meta.model; }
const std::string& TraceReader::dataset() const { return impl_->meta.dataset; }
bool TraceReader::has_weights() const { return impl_->weights != nullptr; }
const std::string& TraceReader::weights_path() const { return impl_->meta.weights_path; }

void TraceReader::set_validation(bool enabled) { impl_->validate = enabled; }
void TraceReader::set_keep_weights(bool keep) { impl_->keep_weights = keep; }

bool TraceReader::next(int64_t max_tokens, RoutingTrace& chunk, int64_t* first_token) {
    GRACE_CHECK_ARG(max_tokens >= 1, "chunk size must be at least 1 token");
    int64_t first = impl_->next_token;
    int64_t rows = impl_->reader->read_int32(max_tokens, chunk.expert_ids);
    chunk.num_tokens = rows;
    chunk.num_layers = impl_->layers;
    chunk.top_k = impl_->k;
    chunk.num_experts = impl_->meta.num_experts;
    chunk.model = impl_->meta.model;
    chunk.dataset = impl_->meta.dataset;
    if (impl_->weights) impl_->weights->read(rows, first, impl_->keep_weights ? &chunk.gate_weights : nullptr);
    if (!impl_->weights || !impl_->keep_weights) chunk.gate_weights.clear();
    if (impl_->validate)
        validate_ids(chunk.expert_ids.data(), rows, impl_->layers, impl_->k, impl_->meta.num_experts, first);
    impl_->next_token += rows;
    if (first_token) *first_token = first;
    return rows > 0;
}

}  // namespace grace
