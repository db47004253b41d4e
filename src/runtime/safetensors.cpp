#include "grace/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "grace/error.hpp"
#include "grace/io.hpp"

namespace grace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string to_string(DType dtype) {
    switch (dtype) {
        case DType::kF32:
            return "F32";
        case DType::kBF16:
            return "BF16";
        case DType::kF16:
            return "F16";
    }
    return "?";
}

int dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

DType parse_dtype(const std::string& name) {
    std::string n = name;
    std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
    if (n == "fp32" || n == "f32" || n == "float32") return DType::kF32;
    if (n == "bf16" || n == "bfloat16") return DType::kBF16;
    if (n == "fp16" || n == "f16" || n == "float16") return DType::kF16;
    throw Error(ErrorCode::kInvalidArgument, cat("unknown dtype '", name, "' (expected fp32, bf16 or fp16)"));
}

uint16_t float_to_bf16(float value) {
    uint32_t bits = std::bit_cast<uint32_t>(value);
    if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
    uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
    return static_cast<uint16_t>((bits + rounding) >> 16);
}

float bf16_to_float(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

float f16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const int exp = (h >> 10) & 0x1f;
    const uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        // Subnormal or zero: value = mant * 2^-24.
        float v = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -v : v;
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
    return std::bit_cast<float>(sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (mant << 13));
}

int64_t TensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

namespace {

void index_file(const std::string& file, std::map<std::string, TensorInfo>& out) {
    std::ifstream in(file, std::ios::binary);
    GRACE_CHECK(in, ErrorCode::kIo, "cannot open safetensors file ", file);
    in.seekg(0, std::ios::end);
    const uint64_t file_size = static_cast<uint64_t>(in.tellg());
    in.seekg(0);
    GRACE_CHECK_INPUT(file_size >= 8, file, ": too short for a safetensors file (", file_size, " bytes)");
    unsigned char len_bytes[8];
    in.read(reinterpret_cast<char*>(len_bytes), 8);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
    GRACE_CHECK_INPUT(header_len >= 2 && header_len <= file_size - 8 && header_len <= (uint64_t{1} << 30), file,
                      ": header length ", header_len, " does not fit a file of ", file_size, " bytes");
    std::string header(header_len, '\0');
    in.read(header.data(), static_cast<std::streamsize>(header_len));
    GRACE_CHECK(in, ErrorCode::kIo, "cannot read the header of ", file);
    json j;
    try {
        j = json::parse(header);
    } catch (const json::exception& e) {
        throw Error(ErrorCode::kInvalidInput, cat(file, ": header is not valid JSON: ", e.what()));
    }
    GRACE_CHECK_INPUT(j.is_object(), file, ": header is not a JSON object");
    const uint64_t data_begin = 8 + header_len;
    const uint64_t data_size = file_size - data_begin;
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (it.key() == "__metadata__") continue;
        const auto& t = it.value();
        const std::string& name = it.key();
        GRACE_CHECK_INPUT(t.is_object() && t.contains("dtype") && t.contains("shape") && t.contains("data_offsets"),
                          file, ": tensor '", name, "' lacks dtype, shape or data_offsets");
        TensorInfo info;
        info.name = name;
        info.file = file;
        const std::string dtype = t["dtype"].is_string() ? t["dtype"].get<std::string>() : "";
        if (dtype == "F32")
            info.dtype = DType::kF32;
        else if (dtype == "BF16")
            info.dtype = DType::kBF16;
        else if (dtype == "F16")
            info.dtype = DType::kF16;
        else
            throw Error(ErrorCode::kInvalidInput, cat(file, ": tensor '", name, "' has unsupported dtype '", dtype,
                                                      "' (supported: F32, BF16, F16)"));
        GRACE_CHECK_INPUT(t["shape"].is_array(), file, ": tensor '", name, "' shape is not an array");
        for (const auto& d : t["shape"]) {
            GRACE_CHECK_INPUT(d.is_number_integer() && d.get<int64_t>() >= 0, file, ": tensor '", name,
                              "' has a bad dimension ", d.dump());
            info.shape.push_back(d.get<int64_t>());
        }
        const auto& off = t["data_offsets"];
        GRACE_CHECK_INPUT(
            off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(), file,
            ": tensor '", name, "' data_offsets must be [begin, end]");
        const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
        GRACE_CHECK_INPUT(b <= e && e <= data_size, file, ": tensor '", name, "' data_offsets [", b, ", ", e,
                          "] exceed the data section of ", data_size, " bytes");
        info.offset = data_begin + b;
        info.num_bytes = e - b;
        GRACE_CHECK_INPUT(info.num_bytes == static_cast<uint64_t>(info.numel()) * dtype_size(info.dtype), file,
                          ": tensor '", name, "' has ", info.num_bytes, " bytes but shape and dtype need ",
                          info.numel() * dtype_size(info.dtype));
        out[name] = std::move(info);
    }
}

}  // namespace

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : path_(path) {
    GRACE_CHECK(fs::exists(path), ErrorCode::kIo, "checkpoint not found: ", path);
    if (!fs::is_directory(path)) {
        index_file(path, tensors_);
        return;
    }
    std::vector<std::string> files;
    const fs::path index = fs::path(path) / "model.safetensors.index.json";
    if (fs::exists(index)) {
        json j;
        try {
            j = json::parse(read_text(index.string()));
        } catch (const json::exception& e) {
            throw Error(ErrorCode::kInvalidInput, cat(index.string(), ": not valid JSON: ", e.what()));
        }
        GRACE_CHECK_INPUT(j.contains("weight_map") && j["weight_map"].is_object(), index.string(),
                          ": lacks a weight_map object");
        for (const auto& [name, file] : j["weight_map"].items()) {
            std::string f = (fs::path(path) / file.get<std::string>()).string();
            if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
        }
    } else {
        for (const auto& entry : fs::directory_iterator(path))
            if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
    }
    std::sort(files.begin(), files.end());
    GRACE_CHECK_INPUT(!files.empty(), "checkpoint folder ", path, " holds no .safetensors file");
    for (const auto& f : files) index_file(f, tensors_);
}

const TensorInfo* SafetensorsCheckpoint::find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
}

std::string SafetensorsCheckpoint::read_raw(const TensorInfo& info) const {
    std::ifstream in(info.file, std::ios::binary);
    GRACE_CHECK(in, ErrorCode::kIo, "cannot open safetensors file ", info.file);
    in.seekg(static_cast<std::streamoff>(info.offset));
    std::string bytes(info.num_bytes, '\0');
    in.read(bytes.data(), static_cast<std::streamsize>(info.num_bytes));
    GRACE_CHECK(in, ErrorCode::kIo, "cannot read tensor '", info.name, "' from ", info.file);
    return bytes;
}

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

std::vector<float> SafetensorsCheckpoint::read_f32(const std::string& name) const {
    const TensorInfo* info = find(name);
    GRACE_CHECK_INPUT(info, "checkpoint ", path_, " has no tensor '", name, "'");
    const std::string raw = read_raw(*info);
    std::vector<float> out(static_cast<size_t>(info->numel()));
    if (info->dtype == DType::kF32) {
        std::memcpy(out.data(), raw.data(), raw.size());
    } else {
        for (size_t i = 0; i < out.size(); ++i) {
            uint16_t h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            out[i] = info->dtype == DType::kBF16 ? bf16_to_float(h) : f16_to_float(h);
        }
    }
    return out;
}

std::vector<uint16_t> SafetensorsCheckpoint::read_bf16(const std::string& name) const {
    const TensorInfo* info = find(name);
    GRACE_CHECK_INPUT(info, "checkpoint ", path_, " has no tensor '", name, "'");
    std::vector<uint16_t> out(static_cast<size_t>(info->numel()));
    if (info->dtype == DType::kBF16) {
        const std::string raw = read_raw(*info);
        std::memcpy(out.data(), raw.data(), raw.size());
        return out;
    }
    std::vector<float> f = read_f32(name);
    for (size_t i = 0; i < out.size(); ++i) out[i] = float_to_bf16(f[i]);
    return out;
}

TensorData make_tensor(DType dtype, std::vector<int64_t> shape, const std::vector<float>& values) {
    TensorData t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    if (dtype == DType::kF32) {
        t.bytes.assign(reinterpret_cast<const char*>(values.data()), values.size() * 4);
    } else if (dtype == DType::kBF16) {
        t.bytes.resize(values.size() * 2);
        for (size_t i = 0; i < values.size(); ++i) {
            uint16_t b = float_to_bf16(values[i]);
            std::memcpy(t.bytes.data() + 2 * i, &b, 2);
        }
    } else {
        throw Error(ErrorCode::kUnsupported, "writing F16 tensors is not supported");
    }
    return t;
}

void write_safetensors(const std::string& path, const std::map<std::string, TensorData>& tensors) {
    json header = json::object();
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
        int64_t numel = 1;
        for (int64_t d : t.shape) numel *= d;
        GRACE_CHECK_ARG(t.bytes.size() == static_cast<size_t>(numel) * dtype_size(t.dtype), "tensor '", name, "' has ",
                        t.bytes.size(), " bytes but its shape needs ", numel * dtype_size(t.dtype));
        header[name] = {
            {"dtype", to_string(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string text = header.dump();
    while (text.size() % 8 != 0) text += ' ';
    write_file_atomic(path, [&](const std::string& tmp) {
        OutputFile out(tmp, path);  // errors name `path` and the cause (e.g. No space left on device)
        uint64_t n = text.size();
        unsigned char len[8];
        for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
        out.write(len, 8);
        out.write(text.data(), text.size());
        for (const auto& [name, t] : tensors) out.write(t.bytes.data(), t.bytes.size());
        out.close();
    });
}

}  // namespace grace
