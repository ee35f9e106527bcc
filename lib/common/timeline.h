// The worker's side of `dtrain run --timeline FILE.json`: a per-process recorder of what this rank spent its time
// on (the trainer's step phases, checkpoints, evaluations, and every collective call with its bytes), buffered in
// memory and appended to a file of its own that the agent merges into one Chrome trace (lib/launch/timeline.h).
//
// Design (Horovod's timeline, without its coordinator): nothing is sent anywhere while training. Events are
// complete intervals ("ph":"X" in the Trace Event Format) kept in a preallocated buffer under a mutex (the
// trainer's thread and the communicators' threads record); the buffer is written out when full and by flush()
// (the trainer's end). A worker that is killed loses its last unwritten events (at most kBufferEvents).
//
// Worker file format (DTRAIN_TIMELINE_FILE, one JSON object per line):
//   {"meta":"worker","rank":R,"node":N,"host":"...","pid":P}            first line
//   {"clock_offset_ns":X}                                                this rank's clock minus rank 0's
//   {"name":"forward","cat":"phase","tid":0,"ts_ns":T,"dur_ns":D[,"args":{...}]}   an event; T is Unix time, ns
// tid 0 is the thread that called start() (the trainer); other threads are numbered in the order they first
// record, and a line {"thread":K,"name":"..."} names each.
//
// Cost when off: one relaxed atomic load per call site. When on: a clock read, a lock and a ~100-byte store per
// event, plus a formatted write per kBufferEvents events.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "lib/common/clock.h"

namespace dtrain::timeline {

inline constexpr const char* kTimelineEnv = "DTRAIN_TIMELINE_FILE";
inline constexpr size_t kBufferEvents = 8192;

// Whether start() succeeded and recording is on. Any thread; a relaxed load.
bool enabled();

// Opens `path` (truncating it) and starts recording; the calling thread becomes tid 0. Throws dtrain::Error
// naming the path when it cannot be written. Idempotent for the same path.
void start(const std::string& path, int rank, int node);
// start() with DTRAIN_TIMELINE_FILE when it is set; returns whether recording is on. Failures are logged as a
// warning and leave recording off (a timeline never stops training).
bool startFromEnv(int rank, int node);

// This rank's clock minus rank 0's, in ns (the trainer measures it at start; the merge subtracts it).
void setClockOffset(int64_t ns);

// Unix time of a steady-clock time point (the conversion is fixed at start(), so intervals stay exact).
int64_t toUnixNs(Clock::time_point t);

// Records one complete event. `name` and `category` must outlive the process (string literals); `detail` is an
// optional args object body without braces (e.g. "\"bytes\":4096"), copied when it fits 63 bytes (else
// dropped). No-op when not enabled.
void record(const char* name, const char* category, Clock::time_point start, Clock::time_point end,
            std::string_view detail = {});
// Names the calling thread in the trace (once per thread; later calls are ignored).
void nameThread(const std::string& name);

// Writes the buffered events out (fflush included). Any thread.
void flush();
// flush() and stop recording (tests; the process's end flushes by itself).
void stop();

}  // namespace dtrain::timeline
