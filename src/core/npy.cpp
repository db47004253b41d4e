#include "grace/npy.hpp"

#include <bit>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "grace/error.hpp"
#include "grace/io.hpp"

namespace grace {

namespace {

constexpr char kMagic[] = "\x93NUMPY";

// Finds `'key':` in the header dict and returns the text after the colon, trimmed at the value's end.
std::string dict_value(const std::string& dict, const std::string& key, const std::string& path) {
    auto pos = dict.find("'" + key + "'");
    if (pos == std::string::npos) pos = dict.find("\"" + key + "\"");
    GRACE_CHECK_INPUT(pos != std::string::npos, path, ": not a valid .npy file (header has no '", key, "')");
    pos = dict.find(':', pos);
    GRACE_CHECK_INPUT(pos != std::string::npos, path, ": not a valid .npy file (malformed header)");
    ++pos;
    while (pos < dict.size() && dict[pos] == ' ') ++pos;
    size_t end = pos;
    if (pos < dict.size() && dict[pos] == '(') {
        end = dict.find(')', pos);
        GRACE_CHECK_INPUT(end != std::string::npos, path, ": not a valid .npy file (malformed shape)");
        ++end;
    } else if (pos < dict.size() && (dict[pos] == '\'' || dict[pos] == '"')) {
        end = dict.find(dict[pos], pos + 1);
        GRACE_CHECK_INPUT(end != std::string::npos, path, ": not a valid .npy file (malformed descr)");
        ++end;
    } else {
        while (end < dict.size() && dict[end] != ',' && dict[end] != '}') ++end;
    }
    return dict.substr(pos, end - pos);
}

void parse_descr(const std::string& quoted, NpyHeader& h, const std::string& path) {
    GRACE_CHECK_INPUT(quoted.size() >= 4, path, ": unsupported dtype ", quoted);
    std::string d = quoted.substr(1, quoted.size() - 2);
    char order = d[0];
    char kind = d[1];
    int size = 0;
    try {
        size = std::stoi(d.substr(2));
    } catch (...) {
        GRACE_CHECK_INPUT(false, path, ": unsupported dtype '", d, "' (expected an integer or float array)");
    }
    GRACE_CHECK_INPUT(order == '<' || order == '>' || order == '|' || order == '=', path, ": unsupported dtype '", d,
                      "'");
    h.big_endian = order == '>' || (order == '=' && std::endian::native == std::endian::big);
    h.item_size = size;
    auto bad = [&] {
        GRACE_CHECK_INPUT(false, path, ": unsupported dtype '", d,
                          "' (expected an integer or float array, not structured, complex, string or object)");
    };
    switch (kind) {
        case 'i':
            if (size == 1)
                h.dtype = DType::kInt8;
            else if (size == 2)
                h.dtype = DType::kInt16;
            else if (size == 4)
                h.dtype = DType::kInt32;
            else if (size == 8)
                h.dtype = DType::kInt64;
            else
                bad();
            break;
        case 'u':
            if (size == 1)
                h.dtype = DType::kUInt8;
            else if (size == 2)
                h.dtype = DType::kUInt16;
            else if (size == 4)
                h.dtype = DType::kUInt32;
            else if (size == 8)
                h.dtype = DType::kUInt64;
            else
                bad();
            break;
        case 'f':
            if (size == 2)
                h.dtype = DType::kFloat16;
            else if (size == 4)
                h.dtype = DType::kFloat32;
            else if (size == 8)
                h.dtype = DType::kFloat64;
            else
                bad();
            break;
        case 'b':
            if (size == 1)
                h.dtype = DType::kBool;
            else
                bad();
            break;
        default:
            bad();
    }
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
    GRACE_CHECK_INPUT(text.size() >= 2 && text.front() == '(' && text.back() == ')', path,
                      ": not a valid .npy file (malformed shape ", text, ")");
    std::vector<int64_t> shape;
    std::string inner = text.substr(1, text.size() - 2);
    size_t pos = 0;
    while (pos < inner.size()) {
        while (pos < inner.size() && (inner[pos] == ' ' || inner[pos] == ',')) ++pos;
        if (pos >= inner.size()) break;
        size_t end = pos;
        while (end < inner.size() && inner[end] != ',') ++end;
        std::string num = inner.substr(pos, end - pos);
        while (!num.empty() && num.back() == ' ') num.pop_back();
        if (!num.empty() && num.back() == 'L') num.pop_back();
        try {
            size_t used = 0;
            long long v = std::stoll(num, &used);
            GRACE_CHECK_INPUT(used == num.size() && v >= 0, path, ": bad dimension '", num, "' in shape");
            shape.push_back(v);
        } catch (const Error&) {
            throw;
        } catch (...) {
            GRACE_CHECK_INPUT(false, path, ": bad dimension '", num, "' in shape");
        }
        pos = end;
    }
    return shape;
}

float half_to_float(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal
            float v = std::ldexp(static_cast<float>(mant), -24);
            return sign ? -v : v;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return std::bit_cast<float>(bits);
}

template <typename T>
T load_swapped(const unsigned char* p, int size, bool swap) {
    unsigned char buf[8];
    if (swap) {
        for (int i = 0; i < size; ++i) buf[i] = p[size - 1 - i];
    } else {
        std::memcpy(buf, p, size);
    }
    T v;
    std::memcpy(&v, buf, sizeof(T));
    return v;
}

// Converts one element to double (exact for every integer up to 2^53) and to int64 when integral.
double element_as_double(const NpyHeader& h, const unsigned char* p) {
    bool swap = h.big_endian != (std::endian::native == std::endian::big);
    switch (h.dtype) {
        case DType::kInt8:
            return static_cast<int8_t>(*p);
        case DType::kUInt8:
            return *p;
        case DType::kBool:
            return *p != 0;
        case DType::kInt16:
            return load_swapped<int16_t>(p, 2, swap);
        case DType::kUInt16:
            return load_swapped<uint16_t>(p, 2, swap);
        case DType::kInt32:
            return load_swapped<int32_t>(p, 4, swap);
        case DType::kUInt32:
            return load_swapped<uint32_t>(p, 4, swap);
        case DType::kInt64:
            return static_cast<double>(load_swapped<int64_t>(p, 8, swap));
        case DType::kUInt64:
            return static_cast<double>(load_swapped<uint64_t>(p, 8, swap));
        case DType::kFloat16:
            return half_to_float(load_swapped<uint16_t>(p, 2, swap));
        case DType::kFloat32:
            return load_swapped<float>(p, 4, swap);
        case DType::kFloat64:
            return load_swapped<double>(p, 8, swap);
    }
    return 0;
}

int64_t element_as_int(const NpyHeader& h, const unsigned char* p, const std::string& path) {
    bool swap = h.big_endian != (std::endian::native == std::endian::big);
    switch (h.dtype) {
        case DType::kInt64:
            return load_swapped<int64_t>(p, 8, swap);
        case DType::kUInt64: {
            uint64_t v = load_swapped<uint64_t>(p, 8, swap);
            GRACE_CHECK_INPUT(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), path, ": value ", v,
                              " does not fit in int64");
            return static_cast<int64_t>(v);
        }
        case DType::kFloat16:
        case DType::kFloat32:
        case DType::kFloat64: {
            double v = element_as_double(h, p);
            GRACE_CHECK_INPUT(std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9.0e15, path,
                              ": expected whole numbers, found ", v);
            return static_cast<int64_t>(v);
        }
        default:
            return static_cast<int64_t>(element_as_double(h, p));
    }
}

}  // namespace

int64_t NpyHeader::num_elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

bool NpyHeader::is_integer() const { return !is_float(); }
bool NpyHeader::is_float() const {
    return dtype == DType::kFloat16 || dtype == DType::kFloat32 || dtype == DType::kFloat64;
}

std::string NpyHeader::dtype_name() const {
    switch (dtype) {
        case DType::kInt8:
            return "int8";
        case DType::kInt16:
            return "int16";
        case DType::kInt32:
            return "int32";
        case DType::kInt64:
            return "int64";
        case DType::kUInt8:
            return "uint8";
        case DType::kUInt16:
            return "uint16";
        case DType::kUInt32:
            return "uint32";
        case DType::kUInt64:
            return "uint64";
        case DType::kFloat16:
            return "float16";
        case DType::kFloat32:
            return "float32";
        case DType::kFloat64:
            return "float64";
        case DType::kBool:
            return "bool";
    }
    return "?";
}

NpyHeader read_npy_header(const std::string& path) {
    // A folder opens fine on Linux and would only fail later as "bad magic": say what it is instead.
    std::error_code dir_ec;
    GRACE_CHECK(!std::filesystem::is_directory(path, dir_ec), ErrorCode::kIo, path, ": is a folder, not a .npy file");
    std::FILE* f = std::fopen(path.c_str(), "rb");
    const int open_errno = errno;
    GRACE_CHECK(f != nullptr, ErrorCode::kIo, path, ": ",
                open_errno == ENOENT ? std::string("no such file")
                                     : "cannot open (" + std::string(std::strerror(open_errno)) + ")");
    struct Closer {
        std::FILE* f;
        ~Closer() { std::fclose(f); }
    } closer{f};
    unsigned char pre[12];
    size_t got = std::fread(pre, 1, 10, f);
    GRACE_CHECK_INPUT(got == 10 && std::memcmp(pre, kMagic, 6) == 0, path, ": not a .npy file (bad magic)");
    int major = pre[6];
    GRACE_CHECK_INPUT(major >= 1 && major <= 3, path, ": unsupported .npy format version ", major);
    int64_t header_len, prefix;
    if (major == 1) {
        header_len = pre[8] | (pre[9] << 8);
        prefix = 10;
    } else {
        GRACE_CHECK_INPUT(std::fread(pre + 10, 1, 2, f) == 2, path, ": truncated .npy header");
        header_len = static_cast<int64_t>(pre[8]) | (static_cast<int64_t>(pre[9]) << 8) |
                     (static_cast<int64_t>(pre[10]) << 16) | (static_cast<int64_t>(pre[11]) << 24);
        prefix = 12;
    }
    GRACE_CHECK_INPUT(header_len > 0 && header_len < (1 << 24), path, ": bad .npy header length");
    std::string dict(static_cast<size_t>(header_len), '\0');
    GRACE_CHECK_INPUT(std::fread(dict.data(), 1, dict.size(), f) == dict.size(), path, ": truncated .npy header");
    NpyHeader h;
    parse_descr(dict_value(dict, "descr", path), h, path);
    std::string fortran = dict_value(dict, "fortran_order", path);
    GRACE_CHECK_INPUT(fortran.rfind("False", 0) == 0, path,
                      ": Fortran-ordered arrays are not supported (save it with np.ascontiguousarray)");
    h.shape = parse_shape(dict_value(dict, "shape", path), path);
    h.data_offset = prefix + header_len;
    // The shape's product and byte size must fit in int64 before the truncation check can mean anything: a
    // wrapped product (e.g. 2^32 x 2^32 = 0) would otherwise pass it and size buffers from garbage.
    int64_t elements = 1;
    bool overflow = false;
    for (int64_t d : h.shape) overflow = overflow || __builtin_mul_overflow(elements, d, &elements);
    int64_t bytes = 0;
    overflow = overflow || __builtin_mul_overflow(elements, static_cast<int64_t>(h.item_size), &bytes) ||
               __builtin_add_overflow(bytes, h.data_offset, &bytes);
    if (overflow) {
        std::string shape;
        for (int64_t d : h.shape) shape += (shape.empty() ? "" : " x ") + std::to_string(d);
        GRACE_CHECK_INPUT(false, path, ": shape ", shape, " of ", h.item_size,
                          "-byte elements overflows a 64-bit size");
    }
    std::error_code ec;
    auto size = std::filesystem::file_size(path, ec);
    GRACE_CHECK(!ec, ErrorCode::kIo, "cannot stat ", path);
    GRACE_CHECK_INPUT(static_cast<__int128>(size) >= bytes, path, ": truncated .npy file (", size,
                      " bytes, shape needs ", bytes, ")");
    return h;
}

NpyRowReader::NpyRowReader(const std::string& path) : path_(path), header_(read_npy_header(path)) {
    file_ = std::fopen(path.c_str(), "rb");
    GRACE_CHECK(file_ != nullptr, ErrorCode::kIo, "cannot open ", path);
    if (std::fseek(file_, static_cast<long>(header_.data_offset), SEEK_SET) != 0) {
        std::fclose(file_);
        file_ = nullptr;
        GRACE_CHECK(false, ErrorCode::kIo, "cannot seek in ", path);
    }
}

NpyRowReader::~NpyRowReader() {
    if (file_) std::fclose(file_);
}

int64_t NpyRowReader::num_rows() const { return header_.shape.empty() ? 1 : header_.shape[0]; }

int64_t NpyRowReader::row_size() const {
    int64_t n = 1;
    for (size_t i = 1; i < header_.shape.size(); ++i) n *= header_.shape[i];
    return n;
}

template <typename T>
int64_t NpyRowReader::read_rows(int64_t max_rows, std::vector<T>& out, bool require_integral) {
    int64_t rows = std::min<int64_t>(max_rows, num_rows() - rows_done_);
    if (rows <= 0) {
        out.clear();
        return 0;
    }
    int64_t n = rows * row_size();
    buffer_.resize(static_cast<size_t>(n * header_.item_size));
    GRACE_CHECK(std::fread(buffer_.data(), 1, buffer_.size(), file_) == buffer_.size(), ErrorCode::kIo,
                "read error in ", path_, " (file truncated while reading?)");
    out.resize(static_cast<size_t>(n));
    const unsigned char* p = buffer_.data();
    const int isz = header_.item_size;
    bool native = header_.big_endian == (std::endian::native == std::endian::big) || isz == 1;
    if constexpr (std::is_same_v<T, int64_t>) {
        if (native && header_.dtype == DType::kInt32) {
            for (int64_t i = 0; i < n; ++i) {
                int32_t v;
                std::memcpy(&v, p + i * 4, 4);
                out[i] = v;
            }
        } else if (native && header_.dtype == DType::kInt64) {
            std::memcpy(out.data(), p, static_cast<size_t>(n) * 8);
        } else {
            for (int64_t i = 0; i < n; ++i) out[i] = element_as_int(header_, p + i * isz, path_);
        }
    } else {
        (void)require_integral;
        for (int64_t i = 0; i < n; ++i) out[i] = element_as_double(header_, p + i * isz);
    }
    rows_done_ += rows;
    return rows;
}

int64_t NpyRowReader::read_int(int64_t max_rows, std::vector<int64_t>& out) { return read_rows(max_rows, out, true); }

int64_t NpyRowReader::read_int32(int64_t max_rows, std::vector<int32_t>& out) {
    const bool native = header_.big_endian == (std::endian::native == std::endian::big);
    if (header_.dtype != DType::kInt32 || !native) {
        std::vector<int64_t> wide;
        int64_t rows = read_rows(max_rows, wide, true);
        out.resize(wide.size());
        for (size_t i = 0; i < wide.size(); ++i) {
            GRACE_CHECK_INPUT(wide[i] >= INT32_MIN && wide[i] <= INT32_MAX, path_, ": value ", wide[i], " at element ",
                              i, " of the chunk does not fit in int32");
            out[i] = static_cast<int32_t>(wide[i]);
        }
        return rows;
    }
    int64_t rows = std::min<int64_t>(max_rows, num_rows() - rows_done_);
    if (rows <= 0) {
        out.clear();
        return 0;
    }
    out.resize(static_cast<size_t>(rows * row_size()));
    GRACE_CHECK(std::fread(out.data(), sizeof(int32_t), out.size(), file_) == out.size(), ErrorCode::kIo,
                "read error in ", path_, " (file truncated while reading?)");
    rows_done_ += rows;
    return rows;
}
int64_t NpyRowReader::read_float(int64_t max_rows, std::vector<double>& out) { return read_rows(max_rows, out, false); }

std::vector<int64_t> read_npy_int(const std::string& path, std::vector<int64_t>* shape) {
    NpyRowReader reader(path);
    if (shape) *shape = reader.header().shape;
    std::vector<int64_t> out;
    reader.read_int(reader.num_rows(), out);
    return out;
}

std::vector<double> read_npy_float(const std::string& path, std::vector<int64_t>* shape) {
    NpyRowReader reader(path);
    if (shape) *shape = reader.header().shape;
    std::vector<double> out;
    reader.read_float(reader.num_rows(), out);
    return out;
}

namespace {

template <typename T>
void write_npy_impl(const std::string& path, const std::vector<T>& data, const std::vector<int64_t>& shape,
                    const char* descr) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    GRACE_CHECK_ARG(n == static_cast<int64_t>(data.size()), "write_npy(", path, "): shape holds ", n,
                    " elements but data has ", data.size());
    std::string shape_text = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        shape_text += std::to_string(shape[i]);
        if (shape.size() == 1 || i + 1 < shape.size()) shape_text += ",";
        if (i + 1 < shape.size()) shape_text += " ";
    }
    shape_text += ")";
    std::string dict = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape_text + ", }";
    // Pad so that the data starts on a 64-byte boundary, with a trailing newline (the format's rule).
    bool v2 = dict.size() + 11 > 65535;
    size_t prefix = v2 ? 12 : 10;
    size_t total = prefix + dict.size() + 1;
    size_t pad = (64 - total % 64) % 64;
    dict += std::string(pad, ' ') + "\n";
    static_assert(std::endian::native == std::endian::little, "grace writes little-endian .npy on little-endian hosts");
    write_file_atomic(path, [&](const std::string& tmp) {
        OutputFile f(tmp, path);  // errors name `path` and the cause (e.g. No space left on device)
        std::string head(kMagic, 6);
        head += static_cast<char>(v2 ? 2 : 1);
        head += '\0';
        uint32_t len = static_cast<uint32_t>(dict.size());
        head += static_cast<char>(len & 0xff);
        head += static_cast<char>((len >> 8) & 0xff);
        if (v2) {
            head += static_cast<char>((len >> 16) & 0xff);
            head += static_cast<char>((len >> 24) & 0xff);
        }
        head += dict;
        f.write(head.data(), head.size());
        f.write(data.data(), data.size() * sizeof(T));
        f.close();
    });
}

}  // namespace

void write_npy(const std::string& path, const std::vector<int32_t>& data, const std::vector<int64_t>& shape) {
    write_npy_impl(path, data, shape, "<i4");
}
void write_npy(const std::string& path, const std::vector<int64_t>& data, const std::vector<int64_t>& shape) {
    write_npy_impl(path, data, shape, "<i8");
}
void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<int64_t>& shape) {
    write_npy_impl(path, data, shape, "<f4");
}
void write_npy(const std::string& path, const std::vector<double>& data, const std::vector<int64_t>& shape) {
    write_npy_impl(path, data, shape, "<f8");
}

}  // namespace grace
