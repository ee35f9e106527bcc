// How the nccl backend waits for a collective without ever hanging (nccl_backend.cpp's waitEvent), kept free of
// CUDA and NCCL types so its logic is unit-tested on the CPU (tests/comm/test_nccl_wait.cpp) with fake probes.
//
// Each round, in this order: the operation's CUDA event is queried (done: return; a GPU failure reported by the
// query: CommError "<call> failed on the GPU: <CUDA's text>"); NCCL's asynchronous error is polled
// (ncclCommGetAsyncError: a dead peer, a network error: CommError "<call> failed: NCCL reported <text>"); the
// collective's deadline (parallel.timeout) is checked (CommError "<call> timed out after <ms> ms (stalled or dead
// peer)"). So a rank stuck in a collective fails within the timeout plus one round, with the call named, and the
// launcher's restart logic applies (exit 7); the caller then aborts the communicator (ncclCommAbort) so the other
// ranks' collectives fail too. Short operations are polled in a tight loop; after `spinRounds` rounds each round
// pauses (50 us in the backend) so a long all-reduce does not burn a core.
//
// Every such message, and the backend's own for a non-blocking call that fails or never settles (nccl_backend.cpp
// settle: "<call> failed: <NCCL's text> <ncclGetLastError>", "<call> timed out after <ms> ms (a peer did not join
// or stalled)"), ends with " (<file>:<line>)" of the NCCL call it is about (NcclCall: where the collective was
// enqueued, the path from the repository root, lib/common/source_site.h), as the blocking calls' DTRAIN_NCCL_CHECK
// does (lib/gpu/nccl.h); where() is the same file:line as the compiler spelled it.
//
// Teardown (releaseCommunicator): the communicator is non-blocking (config.blocking = 0), and NCCL's documented
// teardown for one is ncclCommFinalize (flushes its work, answers ncclInProgress), polled with
// ncclCommGetAsyncError until it settles, then ncclCommDestroy, which is then local and never blocks (NCCL 2.14's
// notes). A bare ncclCommDestroy finalises inside itself and may wait on the peers for ever when one is gone. A
// finalize that fails or outlasts the deadline is given up: the communicator is aborted instead, so a destructor
// never hangs.
// Header-only; thread-safety: the probes'. Errors: CommError as above; the probes' other exceptions pass through.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <functional>
#include <string>

#include "lib/common/error.h"
#include "lib/common/source_site.h"

namespace dtrain::comm::nccl {

// An NCCL call as its errors name it: the call ("ncclAllReduce") and where it was made (__FILE__, __LINE__ of the
// call; DTRAIN_NCCL_CALL captures them at the macro).
struct NcclCall {
  const char* name = "NCCL operation";
  const char* file = "";
  int line = 0;
};
#define DTRAIN_NCCL_CALL(name) (::dtrain::comm::nccl::NcclCall{(name), __FILE__, __LINE__})
// Makes the call `expr` (an NCCL function call), first setting `callVar` to DTRAIN_NCCL_CALL(name) on the line the
// macro starts; evaluates to expr's result:   r = DTRAIN_NCCL_ISSUE(call, "ncclAllReduce", ncclAllReduce(...));
#define DTRAIN_NCCL_ISSUE(callVar, name, expr) ((callVar) = DTRAIN_NCCL_CALL(name), (expr))

// Throws CommError "<call> <what> (<file>:<line>)", where() the call's __FILE__:__LINE__.
[[noreturn]] inline void throwCallError(const NcclCall& call, const std::string& what) {
  ::dtrain::detail::throwAt<CommError>(
      call.file, call.line,
      ::fmt::format("{} {} ({})", call.name, what, ::dtrain::detail::sourceSite(call.file, call.line)));
}

// A non-blocking call that returned an error: "<call> failed: <NCCL's text>[ <NCCL's last error>] (<file>:<line>)".
[[noreturn]] inline void throwCallFailed(const NcclCall& call, const std::string& ncclText,
                                         const std::string& lastError) {
  throwCallError(call, lastError.empty() ? ::fmt::format("failed: {}", ncclText)
                                         : ::fmt::format("failed: {} {}", ncclText, lastError));
}

struct WaitProbes {
  // Whether the operation finished; throws dtrain::Error (gpu::GpuError) when the GPU reported a failure of it.
  std::function<bool()> finished;
  // NCCL's asynchronous error as text ("" while none, or while the communicator is still in progress).
  std::function<std::string()> asyncError;
  // Whether the collective's deadline passed.
  std::function<bool()> expired;
  // Called once per round after `spinRounds` rounds (a short sleep in the backend).
  std::function<void()> pause;
  int spinRounds = 1000;
};

inline void waitForCollective(const NcclCall& call, std::chrono::milliseconds timeout, const WaitProbes& probe) {
  for (int rounds = 0;; ++rounds) {
    bool finished = false;
    try {
      finished = probe.finished();
    } catch (const Error& e) {
      throwCallError(call, ::fmt::format("failed on the GPU: {}", e.what()));
    }
    if (finished) return;
    if (const std::string async = probe.asyncError(); !async.empty())
      throwCallError(call, ::fmt::format("failed: NCCL reported {}", async));
    if (probe.expired())
      throwCallError(call, ::fmt::format("timed out after {} ms (stalled or dead peer)", timeout.count()));
    if (rounds > probe.spinRounds && probe.pause) probe.pause();
  }
}

// The calls releaseCommunicator makes, NCCL's results as booleans (the backend maps ncclResult_t onto them).
struct TeardownProbes {
  // ncclCommFinalize: whether it was accepted (ncclSuccess or ncclInProgress).
  std::function<bool()> finalize;
  // ncclCommGetAsyncError after it: 1 settled (ncclSuccess), 0 still in progress, -1 failed.
  std::function<int()> state;
  std::function<bool()> expired;
  std::function<void()> pause;  // between polls
  std::function<void()> destroy;  // ncclCommDestroy
  std::function<void()> abort;    // ncclCommAbort
};

// Finalize, wait for it to settle (bounded by `expired`), then destroy; abort instead when finalize is refused,
// fails or does not settle in time. Returns true when the communicator was destroyed cleanly. Never throws
// (a destructor calls it) unless a probe does.
inline bool releaseCommunicator(const TeardownProbes& probe) {
  int state = probe.finalize() ? 0 : -1;
  while (state == 0) {
    state = probe.state();
    if (state != 0) break;
    if (probe.expired()) {
      state = -1;
      break;
    }
    probe.pause();
  }
  if (state == 1) {
    probe.destroy();
    return true;
  }
  probe.abort();
  return false;
}

}  // namespace dtrain::comm::nccl
