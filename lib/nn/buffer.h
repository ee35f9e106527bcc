// FloatBuffer: an owning, zero-initialised, 64-byte aligned float array (one AVX-512 register / cache line),
// used for the parameter and gradient arenas, activations and optimizer state. Moving it keeps the data
// where it is, so pointers into it (layers bind to the arenas) stay valid when the owner moves.
// Not thread-safe; not copyable (copy explicitly with std::copy when a snapshot is wanted).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>

namespace dtrain::nn {

class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(size_t count) : count_(count) {
    if (count == 0) return;
    // aligned_alloc wants a size that is a multiple of the alignment.
    size_t bytes = (count * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    data_.reset(static_cast<float*>(p));
  }

  float* data() noexcept { return data_.get(); }
  const float* data() const noexcept { return data_.get(); }
  size_t size() const noexcept { return count_; }
  std::span<float> span() noexcept { return {data_.get(), count_}; }
  std::span<const float> span() const noexcept { return {data_.get(), count_}; }
  void zero() noexcept {
    if (count_ != 0) std::memset(data_.get(), 0, count_ * sizeof(float));
  }

 private:
  static constexpr size_t kAlign = 64;
  struct Free {
    void operator()(float* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
  size_t count_ = 0;
};

}  // namespace dtrain::nn
