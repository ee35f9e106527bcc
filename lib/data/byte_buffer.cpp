#include "lib/data/byte_buffer.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "lib/common/error.h"

namespace dtrain::data {

ByteBuffer ByteBuffer::uninitialized(size_t n) {
  ByteBuffer b;
  if (n == 0) return b;
  b.base_ = new std::byte[n];  // default-initialised: no memset
  b.capacity_ = n;
  b.size_ = n;
  return b;
}

ByteBuffer ByteBuffer::copyOf(std::span<const std::byte> bytes) {
  ByteBuffer b = uninitialized(bytes.size());
  if (!bytes.empty()) std::memcpy(b.mutableData(), bytes.data(), bytes.size());
  return b;
}

std::optional<ByteBuffer> ByteBuffer::mapFile(int fd, size_t length) {
  if (length == 0) return ByteBuffer();
  void* p = ::mmap(nullptr, length, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) return std::nullopt;
  // Start reading the file ahead now (a no-op when it is in the page cache already). Not MADV_SEQUENTIAL:
  // batches read samples in shuffled order, and SEQUENTIAL would drop pages behind the reader.
  ::madvise(p, length, MADV_WILLNEED);
  ByteBuffer b;
  b.base_ = static_cast<std::byte*>(p);
  b.capacity_ = length;
  b.size_ = length;
  b.mapped_ = true;
  return b;
}

ByteBuffer& ByteBuffer::operator=(ByteBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    base_ = std::exchange(other.base_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
    offset_ = std::exchange(other.offset_, 0);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, false);
  }
  return *this;
}

void ByteBuffer::reset() noexcept {
  if (base_ != nullptr) {
    if (mapped_) ::munmap(base_, capacity_);
    else delete[] base_;
  }
  base_ = nullptr;
  capacity_ = offset_ = size_ = 0;
  mapped_ = false;
}

std::byte* ByteBuffer::mutableData() {
  DTRAIN_CHECK(!mapped_, "a mapped file's bytes are read-only");
  return base_ + offset_;
}

void ByteBuffer::truncate(size_t n, bool release) {
  if (n >= size_) return;
  size_ = n;
  if (release && !mapped_) *this = copyOf(span());
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
