#pragma once
// Check macros for the CUDA backend (DeepEP style): every runtime/cuBLAS failure becomes grace::Error(kBackend)
// naming the call, the code and the location.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "grace/error.hpp"

#define CUDA_RUNTIME_CHECK(expr)                                                                                \
    do {                                                                                                        \
        cudaError_t grace_err_ = (expr);                                                                        \
        if (grace_err_ != cudaSuccess)                                                                          \
            throw ::grace::Error(                                                                               \
                ::grace::ErrorCode::kBackend,                                                                   \
                ::grace::cat("CUDA error ", cudaGetErrorName(grace_err_), " (", cudaGetErrorString(grace_err_), \
                             ") in ", #expr, " at ", __FILE__, ":", __LINE__));                                 \
    } while (0)

/// After a kernel launch: the launch configuration error, if any.
#define CUDA_LAUNCH_CHECK() CUDA_RUNTIME_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(expr)                                                                                            \
    do {                                                                                                              \
        cublasStatus_t grace_st_ = (expr);                                                                            \
        if (grace_st_ != CUBLAS_STATUS_SUCCESS)                                                                       \
            throw ::grace::Error(::grace::ErrorCode::kBackend,                                                        \
                                 ::grace::cat("cuBLAS error ", cublasGetStatusName(grace_st_), " in ", #expr, " at ", \
                                              __FILE__, ":", __LINE__));                                              \
    } while (0)

/// Host-side invariant for the backend (caller mistakes use GRACE_CHECK_ARG).
#define EP_HOST_ASSERT(cond) GRACE_ASSERT(cond)

namespace grace::cuda {
/// The kernels move rows with 16-byte accesses (and the GEMMs load weights by TMA): a pointer off that grid would be
/// a device fault, which ends the process's CUDA context, so the entry points refuse it first.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
}  // namespace grace::cuda
