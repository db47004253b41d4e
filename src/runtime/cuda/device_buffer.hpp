#pragma once
// A minimal owning device array (cudaMalloc; never managed memory).
#include <cstddef>
#include <type_traits>
#include <vector>

#include "cuda_check.hpp"

namespace grace::cuda {

template <typename T>
class DeviceBuffer {
  public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t n) { resize(n); }
    ~DeviceBuffer() { release(); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), size_(o.size_) { o.ptr_ = nullptr, o.size_ = 0; }

    /// Exactly n elements (contents lost).
    void resize(size_t n) {
        release();
        if (n) CUDA_RUNTIME_CHECK(cudaMalloc(&ptr_, n * sizeof(T)));
        size_ = n;
    }
    /// At least n elements (contents lost when it grows).
    void reserve(size_t n) {
        if (n > size_) resize(n);
    }
    void upload(const std::vector<T>& h) {
        resize(h.size());
        if (!h.empty()) CUDA_RUNTIME_CHECK(cudaMemcpy(ptr_, h.data(), bytes(), cudaMemcpyHostToDevice));
    }
    std::vector<T> download(size_t n) const {
        std::vector<T> h(n);
        if constexpr (std::is_same_v<T, bool>) {
            std::vector<unsigned char> raw(n);
            if (n) CUDA_RUNTIME_CHECK(cudaMemcpy(raw.data(), ptr_, n, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < n; ++i) h[i] = raw[i] != 0;
        } else {
            if (n) CUDA_RUNTIME_CHECK(cudaMemcpy(h.data(), ptr_, n * sizeof(T), cudaMemcpyDeviceToHost));
        }
        return h;
    }
    std::vector<T> download() const { return download(size_); }
    T* data() const { return ptr_; }
    size_t size() const { return size_; }
    size_t bytes() const { return size_ * sizeof(T); }

  private:
    void release() {
        if (ptr_) cudaFree(ptr_);
        ptr_ = nullptr;
        size_ = 0;
    }
    T* ptr_ = nullptr;
    size_t size_ = 0;
};

}  // namespace grace::cuda
