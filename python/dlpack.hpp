#pragma once
/// @file dlpack.hpp
/// Our own declaration of the DLPack C ABI (https://dmlc.github.io/dlpack/latest/, the unversioned "dltensor"
/// capsule that torch.utils.dlpack.to_dlpack and Tensor.__dlpack__() return by default), written from the
/// specification's struct layouts (no vendored code), and a zero-copy importer of such capsules for the bindings.
///
/// Exchange protocol (DLPack's Python specification): a producer returns a PyCapsule named "dltensor" holding a
/// DLManagedTensor*. A consumer that takes ownership renames the capsule "used_dltensor" and calls `deleter` when
/// done; a capsule still named "dltensor" when it dies is freed by the producer's capsule destructor. GRACE never
/// takes ownership: it BORROWS the tensor for the duration of one binding call (the capsule, and the Python tensor
/// behind it, stay referenced by the caller), so the name is left alone and the producer frees it as usual.
/// Device work queued on a stream by that call reads the memory later in stream order, which is safe with
/// PyTorch's caching allocator as long as the tensor is used on (or recorded for) that stream.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "grace/error.hpp"

namespace grace::py_bind::dlpack {

/// DLDeviceType (values fixed by the ABI; only those GRACE names are listed).
enum DLDeviceType : int32_t {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLCUDAManaged = 13,
};

/// DLDevice: where the data lives.
struct DLDevice {
    int32_t device_type;  ///< DLDeviceType
    int32_t device_id;    ///< ordinal (CUDA device index)
};

/// DLDataTypeCode (values fixed by the ABI).
enum DLDataTypeCode : uint8_t {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
};

/// DLDataType: {code, bits per lane, lanes}; torch.bfloat16 is {kDLBfloat, 16, 1}, int32 {kDLInt, 32, 1}.
struct DLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};

/// DLTensor: a strided view. `strides` (in elements) may be null for a compact row-major tensor; the first
/// element is at (char*)data + byte_offset.
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;    ///< [ndim]
    int64_t* strides;  ///< [ndim] or null
    uint64_t byte_offset;
};

/// DLManagedTensor: the tensor plus its producer's context and deleter (see the protocol above).
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor* self);
};

inline bool operator==(const DLDataType& a, const DLDataType& b) {
    return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}
inline constexpr DLDataType kBFloat16{kDLBfloat, 16, 1};
inline constexpr DLDataType kFloat32{kDLFloat, 32, 1};
inline constexpr DLDataType kInt32{kDLInt, 32, 1};
inline constexpr DLDataType kInt64{kDLInt, 64, 1};

/// "bfloat16", "float32", "int64", ... (torch's spelling) for error messages.
inline std::string dtype_name(const DLDataType& t) {
    std::string base;
    switch (t.code) {
        case kDLInt:
            base = "int";
            break;
        case kDLUInt:
            base = "uint";
            break;
        case kDLFloat:
            base = "float";
            break;
        case kDLBfloat:
            base = "bfloat";
            break;
        case kDLComplex:
            base = "complex";
            break;
        case kDLBool:
            return "bool";
        default:
            base = cat("code", int(t.code), "_");
            break;
    }
    return cat(base, int(t.bits), t.lanes != 1 ? cat("x", t.lanes) : std::string());
}

/// A borrowed, checked view of a capsule's tensor: valid while the capsule (and its tensor) are alive.
struct TensorView {
    void* data = nullptr;  ///< first element (byte_offset applied); may be null when numel() == 0
    std::vector<int64_t> shape;
    DLDataType dtype{};
    int device_id = -1;
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t s : shape) n *= s;
        return n;
    }
};

inline std::string shape_string(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += cat(i ? ", " : "", s[i]);
    return out + "]";
}

/// The CUDA device index of the capsule's tensor (checks that it is an unconsumed capsule of a CUDA tensor).
inline int cuda_device_of(const pybind11::handle& obj, const char* name) {
    GRACE_CHECK_ARG(PyCapsule_CheckExact(obj.ptr()) && PyCapsule_IsValid(obj.ptr(), "dltensor"), name,
                    ": expected an unconsumed DLPack capsule (torch.utils.dlpack.to_dlpack(tensor))");
    const auto* managed = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    GRACE_CHECK_ARG(managed && managed->dl_tensor.device.device_type == kDLCUDA, name, ": must be a CUDA tensor");
    return managed->dl_tensor.device.device_id;
}

/// The dtype of an unconsumed capsule's tensor, or `fallback` when `obj` is not one (import_cuda then names the
/// problem).
inline DLDataType dtype_of(const pybind11::handle& obj, DLDataType fallback) {
    if (!PyCapsule_CheckExact(obj.ptr()) || !PyCapsule_IsValid(obj.ptr(), "dltensor")) return fallback;
    const auto* managed = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    return managed ? managed->dl_tensor.dtype : fallback;
}

/// Imports the "dltensor" capsule `obj` as argument `name`: a CUDA tensor on device `device_id`, dtype `dtype`,
/// `ndim` dimensions whose sizes match `dims` (-1 = any), C-contiguous (strides null or row-major; dimensions of
/// size 1 may have any stride), its first element on a multiple of `align` bytes when `align` > 0 (tensors whose
/// rows the kernels move with 16-byte accesses or TMA; a misaligned address there is a CUDA fault that ends the
/// process's CUDA context). Throws kInvalidArgument naming the argument and the problem (not a capsule, a consumed
/// capsule, device, dtype, rank, size, strides, alignment).
inline TensorView import_cuda(const pybind11::handle& obj, const char* name, DLDataType dtype, int device_id,
                              const std::vector<int64_t>& dims, size_t align = 0) {
    GRACE_CHECK_ARG(PyCapsule_CheckExact(obj.ptr()), name,
                    ": expected a DLPack capsule (torch.utils.dlpack.to_dlpack(tensor)), got ",
                    pybind11::str(obj.get_type()).cast<std::string>());
    GRACE_CHECK_ARG(PyCapsule_IsValid(obj.ptr(), "dltensor"), name,
                    ": the DLPack capsule was already consumed (or is a versioned one); pass a fresh to_dlpack()");
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    GRACE_CHECK_ARG(managed != nullptr, name, ": empty DLPack capsule");
    const DLTensor& t = managed->dl_tensor;
    GRACE_CHECK_ARG(t.device.device_type == kDLCUDA, name, ": must be a CUDA tensor, got DLPack device type ",
                    t.device.device_type);
    GRACE_CHECK_ARG(t.device.device_id == device_id, name, ": on cuda:", t.device.device_id,
                    " but the layer runs on cuda:", device_id);
    GRACE_CHECK_ARG(t.dtype == dtype, name, ": dtype ", dtype_name(t.dtype), ", expected ", dtype_name(dtype));
    GRACE_CHECK_ARG(t.ndim == static_cast<int32_t>(dims.size()), name, ": ", t.ndim, " dimensions, expected ",
                    dims.size());
    TensorView v;
    v.shape.assign(t.shape, t.shape + t.ndim);
    for (size_t i = 0; i < dims.size(); ++i)
        GRACE_CHECK_ARG(dims[i] < 0 || v.shape[i] == dims[i], name, ": shape ", shape_string(v.shape), ", dimension ",
                        i, " must be ", dims[i]);
    if (t.strides) {
        int64_t expect = 1;
        for (int i = t.ndim - 1; i >= 0; --i) {
            GRACE_CHECK_ARG(v.shape[i] == 1 || t.strides[i] == expect, name, ": not contiguous (shape ",
                            shape_string(v.shape), ", stride ", t.strides[i], " in dimension ", i, " where ", expect,
                            " is needed); call .contiguous()");
            expect *= v.shape[i];
        }
    }
    v.dtype = t.dtype;
    v.device_id = t.device.device_id;
    v.data = t.data ? static_cast<char*>(t.data) + t.byte_offset : nullptr;
    GRACE_CHECK_ARG(v.data || v.numel() == 0, name, ": null data pointer for shape ", shape_string(v.shape));
    GRACE_CHECK_ARG(align == 0 || v.numel() == 0 || reinterpret_cast<uintptr_t>(v.data) % align == 0, name,
                    ": starts at an address that is not a multiple of ", align,
                    " bytes (a view at an odd offset into its storage); pass .clone() of it");
    return v;
}

}  // namespace grace::py_bind::dlpack
