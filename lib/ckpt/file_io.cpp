#include "lib/ckpt/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"

namespace dtrain::ckpt {

namespace {

constexpr size_t kAlign = 4096;  // O_DIRECT alignment for memory, offsets and lengths on every common device

[[noreturn]] void fail(const std::filesystem::path& path, const char* what, int err) {
  DTRAIN_THROW(CheckpointError, "{}: {} failed ({})", path.string(), what, std::strerror(err));
}

// Writes all of [data, data + size) at `offset`, retrying short writes and EINTR. Returns 0 or an errno.
int writeAll(int fd, const char* data, size_t size, uint64_t offset) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, data, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO;
    data += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return 0;
}

}  // namespace

std::string crcHex(uint32_t crc) { return fmt::format("{:08x}", crc); }

std::optional<uint32_t> parseCrcHex(std::string_view hex) {
  if (hex.size() != 8) return std::nullopt;
  uint32_t v = 0;
  for (char c : hex) {
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return std::nullopt;
    v = v << 4 | static_cast<uint32_t>(d);
  }
  return v;
}

uint32_t crc32Of(std::string_view bytes) {
  return static_cast<uint32_t>(::crc32_z(0, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
}

struct FileSink::Impl {
  static constexpr int kBuffers = 3;
  struct Job {
    int buffer;
    size_t length;
    uint64_t offset;
  };

  std::filesystem::path path;
  Options options;
  int fd = -1;
  std::atomic<bool> direct{false};  // the I/O thread may turn it off
  bool finished = false;
  bool regular = false;  // a regular file, which an abandoned sink removes

  // Caller-side state.
  std::vector<AlignedBuffer<char>> buffers;
  int current = -1;      // buffer being filled, -1 when none
  size_t fill = 0;       // bytes in it
  uint64_t submitted = 0;  // file offset of the next chunk
  uint64_t total = 0;
  uint32_t crc = 0;

  // Shared with the I/O thread.
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Job> queue;
  std::vector<int> freeBuffers;
  int busy = 0;  // jobs taken by the I/O thread and not finished
  int error = 0;
  bool stop = false;
  std::thread io;

  void ioLoop() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      cv.wait(lock, [&] { return stop || !queue.empty(); });
      if (queue.empty()) return;
      Job job = queue.front();
      queue.pop_front();
      ++busy;
      const bool skip = error != 0;
      lock.unlock();
      int err = skip ? 0 : writeChunk(job);
      lock.lock();
      --busy;
      if (err != 0 && error == 0) error = err;
      freeBuffers.push_back(job.buffer);
      cv.notify_all();
    }
  }

  int writeChunk(const Job& job) {
    const char* data = buffers[static_cast<size_t>(job.buffer)].data();
    int err = writeAll(fd, data, job.length, job.offset);
    if (err == EINVAL && direct) {
      // Some file systems accept O_DIRECT at open and refuse the I/O: continue buffered.
      int flags = ::fcntl(fd, F_GETFL);
      if (flags >= 0 && ::fcntl(fd, F_SETFL, flags & ~O_DIRECT) == 0) {
        direct = false;
        err = writeAll(fd, data, job.length, job.offset);
      }
    }
    return err;
  }

  int takeBuffer() {
    std::unique_lock<std::mutex> lock(mutex);
    if (freeBuffers.empty() && static_cast<int>(buffers.size()) < kBuffers) {
      // Uninitialised: a chunk is always filled (and its tail zeroed) before it is written.
      try {
        buffers.push_back(AlignedBuffer<char>::uninitialized(options.chunkBytes, kAlign));
      } catch (const std::bad_alloc&) {
        fail(path, "allocating a write buffer", ENOMEM);
      }
      return static_cast<int>(buffers.size()) - 1;
    }
    cv.wait(lock, [&] { return !freeBuffers.empty(); });
    if (error != 0) fail(path, "write", error);
    int b = freeBuffers.back();
    freeBuffers.pop_back();
    return b;
  }

  void submit(size_t length) {
    if (!io.joinable()) io = std::thread([this] { ioLoop(); });
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (error != 0) fail(path, "write", error);
      queue.push_back({current, length, submitted});
    }
    cv.notify_all();
    submitted += length;
    current = -1;
    fill = 0;
  }

  // Waits until every submitted chunk is written; returns the first error.
  int drain() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return queue.empty() && busy == 0; });
    return error;
  }

  void stopThread() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    cv.notify_all();
    if (io.joinable()) io.join();
  }
};

FileSink::FileSink(std::filesystem::path path) : FileSink(std::move(path), Options{}) {}

FileSink::FileSink(std::filesystem::path path, Options options) : impl_(std::make_unique<Impl>()) {
  DTRAIN_CHECK(options.chunkBytes >= kAlign && options.chunkBytes % kAlign == 0,
               "FileSink chunk size {} is not a multiple of {}", options.chunkBytes, kAlign);
  impl_->path = std::move(path);
  impl_->options = options;
  const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  if (options.direct) {
    impl_->fd = ::open(impl_->path.c_str(), flags | O_DIRECT, 0644);
    impl_->direct = impl_->fd >= 0;
  }
  if (impl_->fd < 0) impl_->fd = ::open(impl_->path.c_str(), flags, 0644);
  if (impl_->fd < 0) fail(impl_->path, "open", errno);
  struct stat st {};
  impl_->regular = ::fstat(impl_->fd, &st) == 0 && S_ISREG(st.st_mode);
}

FileSink::~FileSink() {
  if (!impl_ || impl_->finished) return;
  impl_->stopThread();
  if (impl_->fd >= 0) ::close(impl_->fd);
  if (impl_->regular) {  // never unlink a device or fifo someone pointed us at
    std::error_code ec;
    std::filesystem::remove(impl_->path, ec);
  }
}

bool FileSink::usingDirectIO() const { return impl_->direct; }
uint64_t FileSink::bytesWritten() const { return impl_->total; }

void FileSink::write(const void* data, size_t size) {
  Impl& s = *impl_;
  DTRAIN_CHECK(!s.finished, "{}: write after finish", s.path.string());
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    if (s.current < 0) s.current = s.takeBuffer();
    const size_t n = std::min(size, s.options.chunkBytes - s.fill);
    s.crc = static_cast<uint32_t>(::crc32_z(s.crc, reinterpret_cast<const Bytef*>(p), n));
    std::memcpy(s.buffers[static_cast<size_t>(s.current)].data() + s.fill, p, n);
    s.fill += n;
    s.total += n;
    p += n;
    size -= n;
    if (s.fill == s.options.chunkBytes) s.submit(s.fill);
  }
}

FileRecord FileSink::finish() {
  Impl& s = *impl_;
  DTRAIN_CHECK(!s.finished, "{}: finish called twice", s.path.string());
  if (s.fill > 0) {
    // O_DIRECT needs whole blocks: pad with zeros, then cut the file back to its size below.
    size_t length = s.fill;
    if (s.direct) {
      length = (s.fill + kAlign - 1) / kAlign * kAlign;
      std::memset(s.buffers[static_cast<size_t>(s.current)].data() + s.fill, 0, length - s.fill);
    }
    s.submit(length);
  }
  const int err = s.drain();
  s.stopThread();
  if (err != 0) fail(s.path, "write", err);
  if (::ftruncate(s.fd, static_cast<off_t>(s.total)) != 0) fail(s.path, "ftruncate", errno);
  if (::fdatasync(s.fd) != 0) fail(s.path, "fdatasync", errno);
  const int fd = s.fd;
  s.fd = -1;
  if (::close(fd) != 0) fail(s.path, "close", errno);
  s.finished = true;
  s.buffers.clear();
  return FileRecord{s.path.filename().string(), s.total, s.crc};
}

FileRecord writeFileDurably(const std::filesystem::path& path, std::string_view content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, "open", errno);
  int err = writeAll(fd, content.data(), content.size(), 0);
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  ::close(fd);
  if (err != 0) fail(path, "write", err);
  return FileRecord{path.filename().string(), content.size(),
                    static_cast<uint32_t>(::crc32_z(0, reinterpret_cast<const Bytef*>(content.data()), content.size()))};
}

void syncDirectory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(dir, "open directory", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail(dir, "fsync directory", err);
}

FileRecord checksumFile(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "open", errno);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  constexpr size_t kBlock = size_t{4} << 20;
  std::vector<char> buffer(kBlock);
  FileRecord r{path.filename().string(), 0, 0};
  for (;;) {
    ssize_t n = ::read(fd, buffer.data(), kBlock);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      fail(path, "read", err);
    }
    if (n == 0) break;
    r.crc32 = static_cast<uint32_t>(::crc32_z(r.crc32, reinterpret_cast<const Bytef*>(buffer.data()),
                                              static_cast<size_t>(n)));
    r.size += static_cast<uint64_t>(n);
  }
  ::close(fd);
  return r;
}

std::string readWholeFile(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "open", errno);
  std::string out;
  char buffer[65536];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      fail(path, "read", err);
    }
    if (n == 0) break;
    out.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

}  // namespace dtrain::ckpt
