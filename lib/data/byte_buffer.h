// The bytes of a dataset's raw array, or of a file read whole: either heap memory that is not zero-filled on
// allocation (every producer writes all of it before anyone reads, so a 47 MB dataset costs no memset and no
// second pass of page faults), or a read-only mapping of a file (the data cache's decompressed datasets: the
// ranks on a node then share the page cache's pages, and nothing is copied).
//
// Ownership: a ByteBuffer owns its memory or mapping (freed, or munmap()ed, in the destructor); moving
// transfers it and leaves the source empty; copying makes a deep heap copy. Thread-safety: like std::vector:
// const members may be called from several threads at once, a non-const member needs exclusive access.
// Errors: allocation failure throws std::bad_alloc; mutableData() of a mapping throws dtrain::Error.
//
// A mapping reads the file's pages as they are when touched: a file truncated underneath it makes the next
// access past the new end raise SIGBUS. Only files that are never rewritten in place are mapped: the data
// cache writes a temporary file and rename()s it over the old one (formats.cpp, writeCache), which leaves an
// existing mapping on the old file intact.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
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
  // A read-only private mapping (PROT_READ, MAP_PRIVATE, madvise WILLNEED) of the first `length` bytes of the
  // open regular file `fd` (the fd may be closed afterwards). nullopt, errno set, when mmap fails (a filesystem
  // without mmap): the caller reads the file instead. length 0 gives an empty heap buffer.
  static std::optional<ByteBuffer> mapFile(int fd, size_t length);

  ByteBuffer(ByteBuffer&& other) noexcept { *this = std::move(other); }
  ByteBuffer& operator=(ByteBuffer&& other) noexcept;
  ByteBuffer(const ByteBuffer& other) : ByteBuffer(copyOf(other.span())) {}
  ByteBuffer& operator=(const ByteBuffer& other) {
    if (this != &other) *this = copyOf(other.span());
    return *this;
  }
  ~ByteBuffer() { reset(); }

  const std::byte* data() const { return base_ + offset_; }
  // Writable access, for heap buffers only (throws dtrain::Error for a mapping).
  std::byte* mutableData();
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  bool mapped() const { return mapped_; }
  std::span<const std::byte> span() const { return {data(), size_}; }
  std::byte operator[](size_t i) const { return data()[i]; }  // i < size()
  const std::byte* begin() const { return data(); }
  const std::byte* end() const { return data() + size_; }

  // Keeps the first `n` bytes (n <= size(); larger is a no-op). `release`: give the heap memory past them back
  // (one copy of what is kept; a mapping only shrinks its view), for a dataset cut to a few samples.
  void truncate(size_t n, bool release = false);
  // Drops the first `n` bytes (n <= size()) without copying: a file's header before its data.
  void dropFront(size_t n);
  // Grows or shrinks to `n` bytes keeping the first min(n, size()) (one heap copy when growing); bytes past the
  // old size are indeterminate until written.
  void resize(size_t n);

 private:
  void reset() noexcept;

  std::byte* base_ = nullptr;  // new[]'d memory, or the mapping's start
  size_t capacity_ = 0;        // bytes allocated or mapped
  size_t offset_ = 0;          // bytes dropped at the front
  size_t size_ = 0;
  bool mapped_ = false;
};

}  // namespace dtrain::data
