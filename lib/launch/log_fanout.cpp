#include "lib/launch/log_fanout.h"

#include <fcntl.h>
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
  if (consoleFd_ >= 0) writeAll(consoleFd_, out);
}

}  // namespace dtrain::launch
