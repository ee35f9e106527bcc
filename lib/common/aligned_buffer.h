// AlignedBuffer<T>: an owning, zero-initialised array of T aligned to 64 bytes (a cache line, one AVX-512
// register), or uninitialised with a larger alignment for I/O staging (O_DIRECT wants 4096). The one aligned allocation of the project: the
// model's parameter/gradient arenas, activations, optimizer state, benchmark buffers and checkpoint write
// buffers all use it. Moving it keeps the data where it is, so pointers into it stay valid when the owner
// moves. Not copyable (copy explicitly when a snapshot is wanted); not thread-safe.
// Errors: std::bad_alloc when the memory cannot be had.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <stdexcept>
#include <type_traits>

namespace dtrain {

inline constexpr size_t kBufferAlign = 64;

template <class T>
class AlignedBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "AlignedBuffer holds plain numbers or bytes");

 public:
  AlignedBuffer() = default;
  // `count` elements of T, all bits zero.
  explicit AlignedBuffer(size_t count) : AlignedBuffer(count, kBufferAlign, true) {}
  // `count` elements of T left uninitialised, aligned to `alignment` (a power of two >= kBufferAlign): for I/O
  // staging buffers that are always written before they are read, such as O_DIRECT chunks (4096-aligned), where
  // zeroing megabytes per file would only cost time. Throws std::bad_alloc, or std::invalid_argument for a bad
  // alignment.
  static AlignedBuffer uninitialized(size_t count, size_t alignment = kBufferAlign) {
    return AlignedBuffer(count, alignment, false);
  }

  T* data() noexcept { return data_.get(); }
  const T* data() const noexcept { return data_.get(); }
  size_t size() const noexcept { return count_; }
  size_t bytes() const noexcept { return count_ * sizeof(T); }
  bool empty() const noexcept { return count_ == 0; }
  T& operator[](size_t i) noexcept { return data_.get()[i]; }
  const T& operator[](size_t i) const noexcept { return data_.get()[i]; }
  std::span<T> span() noexcept { return {data_.get(), count_}; }
  std::span<const T> span() const noexcept { return {data_.get(), count_}; }
  void zero() noexcept {
    if (count_ != 0) std::memset(static_cast<void*>(data_.get()), 0, count_ * sizeof(T));
  }

 private:
  AlignedBuffer(size_t count, size_t alignment, bool zero) : count_(count) {
    if (alignment < kBufferAlign || (alignment & (alignment - 1)) != 0)
      throw std::invalid_argument("AlignedBuffer: alignment must be a power of two >= 64");
    if (count == 0) return;
    // aligned_alloc wants a size that is a multiple of the alignment.
    size_t bytes = (count * sizeof(T) + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, bytes);
    if (p == nullptr) throw std::bad_alloc();
    if (zero) std::memset(p, 0, bytes);
    data_.reset(static_cast<T*>(p));
  }

  struct Free {
    void operator()(T* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<T[], Free> data_;
  size_t count_ = 0;
};

}  // namespace dtrain
