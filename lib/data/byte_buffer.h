// The bytes of a dataset's raw array, or of a file read whole: heap memory that is not zero-filled on
// allocation (every producer writes all of it before anyone reads, so a 47 MB dataset costs no memset and no
// second pass of page faults).
//
// Ownership: a ByteBuffer owns its memory (freed in the destructor); moving
// transfers it and leaves the source empty; copying makes a deep heap copy. Thread-safety: like std::vector:
// const members may be called from several threads at once, a non-const member needs exclusive access.
// Errors: allocation failure throws std::bad_alloc.
#pragma once

#include <cstddef>
#include <memory>
#include <span>

namespace dtrain::data {

class ByteBuffer {
 public:
  ByteBuffer() = default;
  // `n` bytes of indeterminate content: the caller writes all of them (or shrinks to what it wrote, with
  // truncate()) before anything reads them.
  static ByteBuffer uninitialized(size_t n);
  // A copy of `bytes`.
  static ByteBuffer copyOf(std::span<const std::byte> bytes);

  ByteBuffer(ByteBuffer&& other) noexcept { *this = std::move(other); }
  ByteBuffer& operator=(ByteBuffer&& other) noexcept;
  ByteBuffer(const ByteBuffer& other) : ByteBuffer(copyOf(other.span())) {}
  ByteBuffer& operator=(const ByteBuffer& other) {
    if (this != &other) *this = copyOf(other.span());
    return *this;
  }
  ~ByteBuffer() { reset(); }

  const std::byte* data() const { return base_ + offset_; }
  std::byte* mutableData() { return base_ + offset_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<const std::byte> span() const { return {data(), size_}; }
  std::byte operator[](size_t i) const { return data()[i]; }  // i < size()
  const std::byte* begin() const { return data(); }
  const std::byte* end() const { return data() + size_; }

  // Keeps the first `n` bytes (n <= size(); larger is a no-op). `release`: give the memory past them back
  // (one copy of what is kept), for a dataset cut to a few samples.
  void truncate(size_t n, bool release = false);
  // Drops the first `n` bytes (n <= size()) without copying: a file's header before its data.
  void dropFront(size_t n);
  // Grows or shrinks to `n` bytes keeping the first min(n, size()) (one heap copy when growing); bytes past the
  // old size are indeterminate until written.
  void resize(size_t n);

 private:
  void reset() noexcept;

  std::byte* base_ = nullptr;  // new[]'d memory
  size_t offset_ = 0;          // bytes dropped at the front
  size_t size_ = 0;
};

}  // namespace dtrain::data
