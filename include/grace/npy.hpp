#pragma once
/// @file npy.hpp
/// NumPy .npy files (format versions 1.0, 2.0, 3.0): read any integer or float dtype in either byte order,
/// C order only; write little-endian C-order arrays. Readers can stream a file in row chunks so that
/// traces larger than RAM can be profiled.

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace grace {

/// Element type of an .npy array, independent of byte order.
enum class DType {
    kInt8,
    kInt16,
    kInt32,
    kInt64,
    kUInt8,
    kUInt16,
    kUInt32,
    kUInt64,
    kFloat16,
    kFloat32,
    kFloat64,
    kBool
};

/// Parsed .npy header.
struct NpyHeader {
    DType dtype = DType::kInt32;
    int item_size = 4;           ///< bytes per element
    bool big_endian = false;     ///< stored byte order
    std::vector<int64_t> shape;  ///< C-order shape; empty for a scalar
    int64_t data_offset = 0;     ///< byte offset of the first element in the file
    /// Product of shape (1 for a scalar).
    int64_t num_elements() const;
    /// "int32", "float64", ... (NumPy's names).
    std::string dtype_name() const;
    bool is_integer() const;
    bool is_float() const;
};

/// Reads and validates the header of `path`. Throws kIo if it cannot be opened, kInvalidInput for a file
/// that is not .npy, is truncated (fewer data bytes than the shape needs), is Fortran-ordered, or has an
/// unsupported dtype (structured, complex, object, strings).
NpyHeader read_npy_header(const std::string& path);

/// Streams rows of an .npy file: each row is the product of shape[1:] elements, converted on the fly.
class NpyRowReader {
  public:
    /// Opens `path`; throws as read_npy_header does.
    explicit NpyRowReader(const std::string& path);
    ~NpyRowReader();
    NpyRowReader(const NpyRowReader&) = delete;
    NpyRowReader& operator=(const NpyRowReader&) = delete;

    const NpyHeader& header() const { return header_; }
    /// shape[0] (1 for a 0-d array).
    int64_t num_rows() const;
    /// Elements per row.
    int64_t row_size() const;
    /// Reads up to `max_rows` next rows as int64 into `out` (resized to rows*row_size); returns the rows read
    /// (0 at the end). Floats that are not whole numbers throw kInvalidInput. Throws kIo on a read error.
    int64_t read_int(int64_t max_rows, std::vector<int64_t>& out);
    /// Same for floating-point values (integers are converted).
    int64_t read_float(int64_t max_rows, std::vector<double>& out);
    /// Reads integer rows as int32; native-order int32 files are read straight into `out` with no conversion
    /// (the fast path for traces). A value outside int32 throws kInvalidInput.
    int64_t read_int32(int64_t max_rows, std::vector<int32_t>& out);

  private:
    template <typename T>
    int64_t read_rows(int64_t max_rows, std::vector<T>& out, bool require_integral);
    std::string path_;
    NpyHeader header_;
    std::FILE* file_ = nullptr;
    int64_t rows_done_ = 0;
    std::vector<unsigned char> buffer_;
};

/// Whole-array readers: the data converted to the requested type, with the header's shape.
std::vector<int64_t> read_npy_int(const std::string& path, std::vector<int64_t>* shape = nullptr);
std::vector<double> read_npy_float(const std::string& path, std::vector<int64_t>* shape = nullptr);

/// Writers: little-endian, C order, format 1.0 (2.0 if the header needs it). Written atomically (a temporary
/// file in the same folder, then rename); throws kIo (naming the path) if the folder is missing or unwritable.
void write_npy(const std::string& path, const std::vector<int32_t>& data, const std::vector<int64_t>& shape);
void write_npy(const std::string& path, const std::vector<int64_t>& data, const std::vector<int64_t>& shape);
void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<int64_t>& shape);
void write_npy(const std::string& path, const std::vector<double>& data, const std::vector<int64_t>& shape);

}  // namespace grace
