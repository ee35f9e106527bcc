#include "lib/launch/log_fanout.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>

#include "lib/common/error.h"

namespace dtrain::launch {

namespace {
// A line longer than this is emitted in pieces rather than buffered without bound.
constexpr size_t kMaxPartial = 64 * 1024;
}  // namespace

void writeAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

ConsoleWriter& ConsoleWriter::forFd(int fd) {
  // Leaked on purpose: a writer thread blocked on a console nobody reads must not be joined at exit.
  static ConsoleWriter* out = new ConsoleWriter(STDOUT_FILENO, kDefaultCapacity);
  static ConsoleWriter* err = new ConsoleWriter(STDERR_FILENO, kDefaultCapacity);
  return fd == STDERR_FILENO ? *err : *out;
}

ConsoleWriter::ConsoleWriter(int fd, size_t capacity) : fd_(fd), capacity_(capacity) {
  thread_ = std::thread([this] { loop(); });
  thread_.detach();
}

void ConsoleWriter::write(std::string_view data) {
  std::lock_guard lock(mu_);
  if (queued_ == 0 && !writing_ && dropped_ == 0) {
    // Direct while the console keeps up: each piece is at most PIPE_BUF bytes and written only when poll says
    // the fd takes more, so this write cannot block (a regular file or a terminal always takes it).
    while (!data.empty()) {
      pollfd p{fd_, POLLOUT, 0};
      int ready = ::poll(&p, 1, 0);
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0 || (p.revents & (POLLERR | POLLNVAL))) break;
      if (p.revents & POLLHUP) return;  // nobody will ever read it: drop silently as writeAll does
      size_t piece = std::min<size_t>(data.size(), PIPE_BUF);
      ssize_t n = ::write(fd_, data.data(), piece);
      if (n < 0) {
        if (errno == EINTR) continue;
        return;
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    if (data.empty()) return;
  }
  if (queued_ + data.size() > capacity_) {
    dropped_ += data.size();
    droppedTotal_ += data.size();
    return;
  }
  if (dropped_ > 0) {
    std::string note = fmt::format("[dtrain] {} bytes of worker output were not shown: the console is not being "
                                   "read fast enough (the --log-dir files have everything)\n",
                                   dropped_);
    queued_ += note.size();
    queue_.push_back(std::move(note));
    dropped_ = 0;
  }
  queued_ += data.size();
  queue_.emplace_back(data);
  cv_.notify_one();
}

void ConsoleWriter::loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return !queue_.empty(); });
    std::string piece = std::move(queue_.front());
    queue_.pop_front();
    writing_ = true;
    lock.unlock();
    writeAll(fd_, piece);  // may block for as long as the reader likes: only this thread waits
    lock.lock();
    writing_ = false;
    queued_ -= piece.size();
    if (queue_.empty()) drained_.notify_all();
  }
}

bool ConsoleWriter::flush(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return drained_.wait_for(lock, timeout, [this] { return queue_.empty() && !writing_; });
}

uint64_t ConsoleWriter::droppedBytes() {
  std::lock_guard lock(mu_);
  return droppedTotal_;
}

StreamSink::StreamSink(std::string prefix, int consoleFd, const std::string& filePath, size_t tailLines)
    : prefix_(std::move(prefix)), consoleFd_(consoleFd), tailLines_(tailLines) {
  if (!filePath.empty()) {
    fileFd_ = ::open(filePath.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fileFd_ < 0) throw SystemError(fmt::format("cannot create log file {}", filePath), errno);
  }
}

StreamSink::~StreamSink() {
  if (fileFd_ >= 0) ::close(fileFd_);
}

void StreamSink::feed(const char* data, size_t size) {
  std::string_view in(data, size);
  if (fileFd_ >= 0) writeAll(fileFd_, in);
  auto lastNl = in.rfind('\n');
  if (lastNl == std::string_view::npos) {
    partial_.append(in);
    if (partial_.size() >= kMaxPartial) {
      partial_.push_back('\n');
      emitLines(partial_);
      partial_.clear();
    }
    return;
  }
  if (partial_.empty()) {
    emitLines(in.substr(0, lastNl + 1));
  } else {
    partial_.append(in.substr(0, lastNl + 1));
    emitLines(partial_);
    partial_.clear();
  }
  partial_.append(in.substr(lastNl + 1));
}

void StreamSink::finish() {
  if (partial_.empty()) return;
  partial_.push_back('\n');
  emitLines(partial_);
  partial_.clear();
}

void StreamSink::emitLines(std::string_view lines) {
  std::string out;
  if (consoleFd_ >= 0) out.reserve(lines.size() + 16 * prefix_.size());
  size_t start = 0;
  while (start < lines.size()) {
    size_t nl = lines.find('\n', start);
    std::string_view line = lines.substr(start, nl - start);
    if (tailLines_ > 0) {
      tail_.emplace_back(line);
      if (tail_.size() > tailLines_) tail_.pop_front();
    }
    if (consoleFd_ >= 0) {
      out += prefix_;
      out.append(line);
      out.push_back('\n');
    }
    start = nl + 1;
  }
  if (consoleFd_ >= 0) ConsoleWriter::forFd(consoleFd_).write(out);
}

}  // namespace dtrain::launch
