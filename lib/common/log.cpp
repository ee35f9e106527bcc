#include "lib/common/log.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dtrain::log {
namespace {

Level levelFromEnv() {
  const char* v = std::getenv("DTRAIN_LOG_LEVEL");
  if (v == nullptr) return Level::kInfo;
  if (std::strcmp(v, "debug") == 0) return Level::kDebug;
  if (std::strcmp(v, "warn") == 0 || std::strcmp(v, "warning") == 0) return Level::kWarn;
  if (std::strcmp(v, "error") == 0) return Level::kError;
  return Level::kInfo;
}

std::atomic<int>& levelStorage() {
  static std::atomic<int> level{static_cast<int>(levelFromEnv())};
  return level;
}

std::mutex& tagMutex() {
  static std::mutex m;
  return m;
}
std::string& tagStorage() {
  static std::string tag = "dtrain";
  return tag;
}

const char* levelName(Level l) {
  switch (l) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warning";
    case Level::kError: return "error";
  }
  return "";
}

}  // namespace

Level level() { return static_cast<Level>(levelStorage().load(std::memory_order_relaxed)); }
void setLevel(Level l) { levelStorage().store(static_cast<int>(l), std::memory_order_relaxed); }
void setTag(std::string tag) {
  std::lock_guard<std::mutex> lock(tagMutex());
  tagStorage() = std::move(tag);
}
bool enabled(Level l) { return static_cast<int>(l) >= levelStorage().load(std::memory_order_relaxed); }

void write(Level l, std::string_view message) {
  std::string line;
  {
    std::lock_guard<std::mutex> lock(tagMutex());
    line = tagStorage();
  }
  line += l == Level::kInfo ? ": " : fmt::format(" {}: ", levelName(l));
  line.append(message);
  line.push_back('\n');
  // One write(2): atomic for pipes up to PIPE_BUF, and never split by stdio buffering.
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace dtrain::log
