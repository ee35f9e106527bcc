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
// Header-only; thread-safety: the probes'. Errors: CommError as above; the probes' other exceptions pass through.
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "lib/common/error.h"

namespace dtrain::comm::nccl {

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

inline void waitForCollective(const char* call, std::chrono::milliseconds timeout, const WaitProbes& probe) {
  for (int rounds = 0;; ++rounds) {
    bool finished = false;
    try {
      finished = probe.finished();
    } catch (const Error& e) {
      DTRAIN_THROW(CommError, "{} failed on the GPU: {}", call, e.what());
    }
    if (finished) return;
    if (const std::string async = probe.asyncError(); !async.empty())
      DTRAIN_THROW(CommError, "{} failed: NCCL reported {}", call, async);
    if (probe.expired())
      DTRAIN_THROW(CommError, "{} timed out after {} ms (stalled or dead peer)", call, timeout.count());
    if (rounds > probe.spinRounds && probe.pause) probe.pause();
  }
}

}  // namespace dtrain::comm::nccl
