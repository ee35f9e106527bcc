#include "lib/common/timeline.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/net.h"

namespace dtrain::timeline {

namespace {

struct Event {
  const char* name;
  const char* category;
  int64_t startNs;
  int64_t durNs;
  int32_t tid;
  uint8_t detailLen;
  char detail[63];
};

struct Recorder {
  std::mutex mu;
  FILE* file = nullptr;
  std::string path;
  std::vector<Event> events;  // reserved to kBufferEvents at start
  int nextTid = 1;
  // Unix time = steady time + this, fixed once so that intervals keep their exact steady-clock lengths.
  int64_t steadyToUnixNs = 0;

  void writeLocked() {
    if (!file) return;
    fmt::memory_buffer out;
    for (const Event& e : events) {
      fmt::format_to(std::back_inserter(out), R"({{"name":"{}","cat":"{}","tid":{},"ts_ns":{},"dur_ns":{})", e.name,
                     e.category, e.tid, e.startNs, e.durNs);
      if (e.detailLen > 0) fmt::format_to(std::back_inserter(out), R"(,"args":{{{}}})", std::string_view(e.detail, e.detailLen));
      out.append(std::string_view("}\n"));
    }
    events.clear();
    if (out.size() > 0) std::fwrite(out.data(), 1, out.size(), file);
    std::fflush(file);
  }
};

Recorder& recorder() {
  static Recorder* r = new Recorder();  // never destroyed: communicator threads may record during exit
  return *r;
}

std::atomic<bool> gEnabled{false};
thread_local int tTid = -1;
thread_local bool tNamed = false;

// The calling thread's id in the trace; assigns the next one. Caller holds the recorder's mutex.
int tidLocked(Recorder& r) {
  if (tTid < 0) tTid = r.nextTid++;
  return tTid;
}

std::string jsonEscaped(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

void flushAtExit() { flush(); }

}  // namespace

bool enabled() { return gEnabled.load(std::memory_order_relaxed); }

void start(const std::string& path, int rank, int node) {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.file && r.path == path) return;
  FILE* f = std::fopen(path.c_str(), "w");
  DTRAIN_CHECK(f != nullptr, "timeline: cannot write {}: {}", path, std::strerror(errno));
  if (r.file) std::fclose(r.file);
  r.file = f;
  r.path = path;
  r.events.reserve(kBufferEvents);
  const auto unixNow = std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::system_clock::now().time_since_epoch());
  const auto steadyNow = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch());
  r.steadyToUnixNs = unixNow.count() - steadyNow.count();
  tTid = 0;
  tNamed = true;
  fmt::print(f, R"({{"meta":"worker","rank":{},"node":{},"host":"{}","pid":{}}})" "\n", rank, node,
             jsonEscaped(net::hostname()), ::getpid());
  fmt::print(f, R"({{"thread":0,"name":"trainer"}})" "\n");
  std::fflush(f);
  static bool registered = false;
  if (!registered) {
    registered = true;
    std::atexit(flushAtExit);
  }
  gEnabled.store(true, std::memory_order_release);
}

bool startFromEnv(int rank, int node) {
  const char* path = std::getenv(kTimelineEnv);
  if (!path || !*path) return false;
  try {
    start(path, rank, node);
    return true;
  } catch (const std::exception& e) {
    log::warn("timeline is off for rank {}: {}", rank, e.what());
    return false;
  }
}

void setClockOffset(int64_t ns) {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.file) fmt::print(r.file, R"({{"clock_offset_ns":{}}})" "\n", ns);
}

int64_t toUnixNs(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count() + recorder().steadyToUnixNs;
}

void record(const char* name, const char* category, Clock::time_point start, Clock::time_point end,
            std::string_view detail) {
  if (!enabled()) return;
  Recorder& r = recorder();
  Event e;
  e.name = name;
  e.category = category;
  e.startNs = toUnixNs(start);
  e.durNs = std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count();
  // A detail that does not fit is dropped whole (cutting it would break the JSON).
  e.detailLen = detail.size() <= sizeof(e.detail) ? static_cast<uint8_t>(detail.size()) : 0;
  std::memcpy(e.detail, detail.data(), e.detailLen);
  std::lock_guard<std::mutex> lock(r.mu);
  e.tid = tidLocked(r);
  r.events.push_back(e);
  if (r.events.size() >= kBufferEvents) r.writeLocked();
}

void nameThread(const std::string& name) {
  if (!enabled() || tNamed) return;
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  tNamed = true;
  if (r.file) fmt::print(r.file, R"({{"thread":{},"name":"{}"}})" "\n", tidLocked(r), jsonEscaped(name));
}

void flush() {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  r.writeLocked();
}

void stop() {
  Recorder& r = recorder();
  gEnabled.store(false, std::memory_order_release);
  std::lock_guard<std::mutex> lock(r.mu);
  r.writeLocked();
  if (r.file) std::fclose(r.file);
  r.file = nullptr;
  r.path.clear();
}

}  // namespace dtrain::timeline
