#pragma once
/// @file safetensors.hpp
/// Reader and writer for Hugging Face safetensors files: an 8-byte little-endian header length n, n bytes of
/// JSON header `{"name": {"dtype": "F32"|"BF16"|"F16"|..., "shape": [...], "data_offsets": [begin, end]},
/// "__metadata__": {...}}`, then the raw little-endian data (offsets relative to the end of the header).
/// A checkpoint is one file or a folder of shards (read through `model.safetensors.index.json` when present,
/// else every `*.safetensors` in it).

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace grace {

/// Element type of a tensor (the safetensors dtype names F32, BF16, F16).
enum class DType { kF32, kBF16, kF16 };

/// "F32", "BF16", "F16".
std::string to_string(DType dtype);
/// Bytes per element.
int dtype_size(DType dtype);
/// Parses "fp32"/"f32"/"F32"/"float32", "bf16"/"BF16"/"bfloat16", "fp16"/"F16"/"float16"; throws kInvalidArgument.
DType parse_dtype(const std::string& name);

/// fp32 -> bf16 bits, round to nearest even (NaN stays NaN).
uint16_t float_to_bf16(float value);
/// bf16 bits -> fp32 (exact).
float bf16_to_float(uint16_t bits);
/// IEEE half bits -> fp32 (exact, subnormals included).
float f16_to_float(uint16_t bits);

/// Where one tensor lies in a file.
struct TensorInfo {
    std::string name;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    std::string file;        ///< the file holding it
    uint64_t offset = 0;     ///< absolute byte offset of its data in `file`
    uint64_t num_bytes = 0;  ///< = numel * dtype_size
    /// Product of the shape (1 for a scalar).
    int64_t numel() const;
};

/// An opened checkpoint (one file or a folder of shards): the tensor index; data is read on demand.
class SafetensorsCheckpoint {
  public:
    /// Opens `path` (a .safetensors file or a folder). Throws kIo if it cannot be read, kInvalidInput for a
    /// malformed header (bad length, bad JSON, unknown dtype, offsets out of range or not matching the shape),
    /// naming the file and the tensor.
    explicit SafetensorsCheckpoint(const std::string& path);

    /// The tensor called `name`, or nullptr.
    const TensorInfo* find(const std::string& name) const;
    /// Every tensor, by name.
    const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
    /// Reads a tensor converted to fp32. Throws kInvalidInput naming the tensor if it is missing.
    std::vector<float> read_f32(const std::string& name) const;
    /// Reads a tensor converted to bf16 bits (exact copy when stored as BF16, rounded otherwise).
    std::vector<uint16_t> read_bf16(const std::string& name) const;
    /// The path it was opened from.
    const std::string& path() const { return path_; }

  private:
    std::string read_raw(const TensorInfo& info) const;
    std::string path_;
    std::map<std::string, TensorInfo> tensors_;
};

/// A tensor to write.
struct TensorData {
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    std::string bytes;  ///< raw little-endian data, numel * dtype_size bytes
};

/// Writes a safetensors file (tensors sorted by name, header padded with spaces to a multiple of 8), atomically.
/// Throws kInvalidArgument if a tensor's byte count does not match its shape.
void write_safetensors(const std::string& path, const std::map<std::string, TensorData>& tensors);

/// Builds TensorData from fp32 values stored as `dtype` (converted: bf16 round-to-nearest-even; f16 unsupported
/// for writing -> kUnsupported).
TensorData make_tensor(DType dtype, std::vector<int64_t> shape, const std::vector<float>& values);

}  // namespace grace
