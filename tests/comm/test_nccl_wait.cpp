// The nccl backend's wait (lib/comm/nccl/nccl_wait.h) with fake probes: a collective whose peer died, whose GPU
// failed or that never finishes fails within its timeout, naming the call; never a hang. The real backend runs
// the same function over a CUDA event and ncclCommGetAsyncError (checked with a GPU by scripts/gpu-check).
#include <doctest/doctest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "lib/comm/nccl/nccl_wait.h"
#include "lib/common/clock.h"

using namespace dtrain;
using namespace dtrain::comm::nccl;

TEST_CASE("nccl wait: returns once the event completes; pauses only after the spin rounds") {
  int queries = 0, pauses = 0;
  waitForCollective("ncclAllReduce", std::chrono::milliseconds(1000),
                    {.finished = [&] { return ++queries == 5; }, .asyncError = [] { return std::string(); },
                     .expired = [] { return false; }, .pause = [&] { ++pauses; }, .spinRounds = 2});
  CHECK(queries == 5);
  CHECK(pauses == 1);  // rounds 0-2 spin, round 3 pauses, round 4 finds it done
}

TEST_CASE("nccl wait: an asynchronous NCCL error (a dead peer) fails the call at once, with NCCL's text") {
  int round = 0;
  CHECK_THROWS_WITH_AS(
      waitForCollective("ncclAllReduce", std::chrono::milliseconds(600000),
                        {.finished = [&] { return false; },
                         .asyncError = [&] { return ++round < 3 ? std::string() : std::string("remote process exited (peer 1)"); },
                         .expired = [] { return false; }, .pause = [] {}}),
      doctest::Contains("ncclAllReduce failed: NCCL reported remote process exited (peer 1)"), CommError);
  CHECK(round == 3);
}

TEST_CASE("nccl wait: a collective that never completes times out, naming the call and the timeout") {
  int rounds = 0;
  CHECK_THROWS_WITH_AS(waitForCollective("ncclBroadcast", std::chrono::milliseconds(1800000),
                                         {.finished = [] { return false; }, .asyncError = [] { return std::string(); },
                                          .expired = [&] { return ++rounds == 4; }, .pause = [] {}}),
                       doctest::Contains("ncclBroadcast timed out after 1800000 ms (stalled or dead peer)"), CommError);
  CHECK(rounds == 4);
}

TEST_CASE("nccl wait: a GPU failure seen by the event query is a collective failure naming the call and CUDA's text") {
  CHECK_THROWS_WITH_AS(
      waitForCollective("ncclAllReduce", std::chrono::milliseconds(1000),
                        {.finished = []() -> bool { throw Error("cudaEventQuery failed: an illegal memory access was encountered"); },
                         .asyncError = [] { return std::string(); }, .expired = [] { return false; }, .pause = [] {}}),
      doctest::Contains("ncclAllReduce failed on the GPU: cudaEventQuery failed: an illegal memory access"), CommError);
}

TEST_CASE("nccl wait: a completed operation wins over an error reported in the same round; the real clock bounds it") {
  CHECK_NOTHROW(waitForCollective("ncclAllReduce", std::chrono::milliseconds(1),
                                  {.finished = [] { return true; }, .asyncError = [] { return std::string("late"); },
                                   .expired = [] { return true; }, .pause = [] {}}));
  // With a real deadline, as the backend builds it: a stalled collective ends (here after 30 ms).
  const Deadline deadline(std::chrono::milliseconds(30));
  CHECK_THROWS_AS(waitForCollective("ncclAllReduce", std::chrono::milliseconds(30),
                                    {.finished = [] { return false; }, .asyncError = [] { return std::string(); },
                                     .expired = [&] { return deadline.expired(); }, .pause = [] {}}),
                  CommError);
}

TEST_CASE("nccl teardown: finalize, poll until it settles, then destroy; a failed or stalled finalize aborts instead") {
  std::string calls;
  auto probes = [&](std::vector<int> states, int expireAfter, bool accepted) {
    auto next = std::make_shared<size_t>(0);
    auto polls = std::make_shared<int>(0);
    return TeardownProbes{.finalize = [&calls, accepted] { calls += "F"; return accepted; },
                          .state =
                              [&calls, states, next] {
                                calls += "s";
                                const int v = states[std::min(*next, states.size() - 1)];
                                ++*next;
                                return v;
                              },
                          .expired = [polls, expireAfter] { return ++*polls > expireAfter; },
                          .pause = [&calls] { calls += "."; },
                          .destroy = [&calls] { calls += "D"; },
                          .abort = [&calls] { calls += "A"; }};
  };
  CHECK(releaseCommunicator(probes({0, 0, 1}, 100, true)));
  CHECK(calls == "Fs.s.sD");  // in progress twice, then settled: destroyed, never aborted
  calls.clear();
  CHECK_FALSE(releaseCommunicator(probes({0, 0, 0, 0}, 2, true)));
  CHECK(calls == "Fs.s.sA");  // never settles: given up at the deadline, aborted (never a hang)
  calls.clear();
  CHECK_FALSE(releaseCommunicator(probes({0, -1}, 100, true)));
  CHECK(calls == "Fs.sA");  // the finalize failed (a dead peer): aborted
  calls.clear();
  CHECK_FALSE(releaseCommunicator(probes({1}, 100, false)));
  CHECK(calls == "FA");  // finalize refused: aborted, the state never polled
}
