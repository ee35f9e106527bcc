#include "lib/data/byte_buffer.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace dtrain::data {

ByteBuffer ByteBuffer::uninitialized(size_t n) {
  ByteBuffer b;
  if (n == 0) return b;
  b.base_ = new std::byte[n];  // default-initialised: no memset
  b.size_ = n;
  return b;
}

ByteBuffer ByteBuffer::copyOf(std::span<const std::byte> bytes) {
  ByteBuffer b = uninitialized(bytes.size());
  if (!bytes.empty()) std::memcpy(b.mutableData(), bytes.data(), bytes.size());
  return b;
}

ByteBuffer& ByteBuffer::operator=(ByteBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    base_ = std::exchange(other.base_, nullptr);
    offset_ = std::exchange(other.offset_, 0);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void ByteBuffer::reset() noexcept {
  delete[] base_;
  base_ = nullptr;
  offset_ = size_ = 0;
}

void ByteBuffer::truncate(size_t n, bool release) {
  if (n >= size_) return;
  size_ = n;
  if (release) *this = copyOf(span());
}

void ByteBuffer::dropFront(size_t n) {
  n = std::min(n, size_);
  offset_ += n;
  size_ -= n;
}

void ByteBuffer::resize(size_t n) {
  if (n <= size_) {
    truncate(n);
    return;
  }
  ByteBuffer grown = uninitialized(n);
  if (size_ > 0) std::memcpy(grown.mutableData(), data(), size_);
  *this = std::move(grown);
}

}  // namespace dtrain::data
