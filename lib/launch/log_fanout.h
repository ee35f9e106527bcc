// Fan-out of worker output: each worker stream (stdout or stderr) arrives on a pipe; complete lines go to
// the agent's console with a `[n<node> r<rank>] ` prefix (one write(2) per batch of whole lines, so lines of
// different workers never interleave mid-line) and/or raw to a per-attempt, per-rank log file. The last lines
// of each stderr are kept for the root-cause report. Used from the agent's event loop thread only.
#pragma once

#include <deque>
#include <string>

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

// Writes all of `data` to fd, retrying on EINTR and short writes; errors are ignored (a closed console must
// not kill the agent).
void writeAll(int fd, std::string_view data);

}  // namespace dtrain::launch
