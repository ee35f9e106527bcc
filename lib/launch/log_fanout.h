// Fan-out of worker output: each worker stream (stdout or stderr) arrives on a pipe; complete lines go to
// the agent's console with a `[n<node> r<rank>] ` prefix (one write(2) per batch of whole lines, so lines of
// different workers never interleave mid-line) and/or raw to a per-attempt, per-rank log file. The last lines
// of each stderr are kept for the root-cause report. Used from the agent's event loop thread only.
//
// The console never blocks the agent: lines for it go through ConsoleWriter, which writes directly while the
// console keeps up and otherwise queues (bounded) for a writer thread, dropping what does not fit with a counted
// note. The log files (--log-dir) are written directly and get everything.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace dtrain::launch {

class StreamSink {
 public:
  // consoleFd: 1, 2 or -1 (not shown); filePath: "" for no file. Throws SystemError when the file cannot
  // be created.
  StreamSink(std::string prefix, int consoleFd, const std::string& filePath, size_t tailLines);
  ~StreamSink();
  StreamSink(const StreamSink&) = delete;
  StreamSink& operator=(const StreamSink&) = delete;

  void feed(const char* data, size_t size);
  // End of stream: a trailing partial line is emitted as a line.
  void finish();
  const std::deque<std::string>& tail() const { return tail_; }

 private:
  void emitLines(std::string_view lines);  // whole lines, each ending in '\n'
  std::string prefix_;
  int consoleFd_;
  int fileFd_ = -1;
  size_t tailLines_;
  std::string partial_;
  std::deque<std::string> tail_;
};

// The agent's console (stdout or stderr) for worker output: write() never blocks on the reader. While nothing is
// queued it writes directly, in pieces that fit the pipe (poll says it is writable); the rest waits in a queue
// of at most `capacity` bytes for a writer thread. Output that does not fit is dropped, and a note saying how
// many bytes were dropped is queued once there is room again. Thread-safe. The two instances (fd 1 and 2) live
// for the whole process and are never destroyed, so that exit never waits on a console nobody reads.
class ConsoleWriter {
 public:
  static constexpr size_t kDefaultCapacity = 16u << 20;
  // The writer for fd 1 or 2.
  static ConsoleWriter& forFd(int fd);

  void write(std::string_view data);
  // Waits up to `timeout` for the queue to be written; false when output is still queued.
  bool flush(std::chrono::milliseconds timeout);
  uint64_t droppedBytes();

  ConsoleWriter(int fd, size_t capacity);
  ConsoleWriter(const ConsoleWriter&) = delete;
  ConsoleWriter& operator=(const ConsoleWriter&) = delete;

 private:
  void loop();
  int fd_;
  size_t capacity_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable drained_;
  std::deque<std::string> queue_;
  size_t queued_ = 0;
  bool writing_ = false;       // the writer thread holds a piece taken from the queue
  uint64_t dropped_ = 0;       // bytes dropped since the last note
  uint64_t droppedTotal_ = 0;
  std::thread thread_;
};

// Writes all of `data` to fd, retrying on EINTR and short writes; errors are ignored (a closed console must
// not kill the agent).
void writeAll(int fd, std::string_view data);

}  // namespace dtrain::launch
