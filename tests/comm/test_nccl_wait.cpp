// The nccl backend's wait (lib/comm/nccl/nccl_wait.h) with fake probes: a collective whose peer died, whose GPU
// failed or that never finishes fails within its timeout, naming the call and the file:line where it was made;
// never a hang. The real backend runs the same function over a CUDA event and ncclCommGetAsyncError (checked with a
// GPU by scripts/gpu-check), and its settle's failures through the same throwCallFailed/throwCallError.
#include <doctest/doctest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "lib/comm/nccl/nccl_wait.h"
#include "lib/common/clock.h"

using namespace dtrain;
using namespace dtrain::comm::nccl;

namespace {

// " (tests/comm/test_nccl_wait.cpp:<line>)": how every nccl failure ends, for a call made on `line` of this file.
std::string siteOf(int line) { return " (tests/comm/test_nccl_wait.cpp:" + std::to_string(line) + ")"; }

bool endsWith(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The CommError a call throws (FAIL when none).
template <class F>
CommError commErrorOf(F&& f) {
  try {
    f();
  } catch (const CommError& e) {
    return e;
  }
  FAIL("no CommError thrown");
  return CommError("");
}

}  // namespace

TEST_CASE("nccl wait: returns once the event completes; pauses only after the spin rounds") {
  int queries = 0, pauses = 0;
  waitForCollective(DTRAIN_NCCL_CALL("ncclAllReduce"), std::chrono::milliseconds(1000),
                    {.finished = [&] { return ++queries == 5; }, .asyncError = [] { return std::string(); },
                     .expired = [] { return false; }, .pause = [&] { ++pauses; }, .spinRounds = 2});
  CHECK(queries == 5);
  CHECK(pauses == 1);  // rounds 0-2 spin, round 3 pauses, round 4 finds it done
}

TEST_CASE("nccl wait: an asynchronous NCCL error (a dead peer) fails the call at once, with NCCL's text, file:line") {
  int round = 0;
  const int line = __LINE__ + 1;
  const NcclCall call = DTRAIN_NCCL_CALL("ncclAllReduce");
  const CommError e = commErrorOf([&] {
    waitForCollective(call, std::chrono::milliseconds(600000),
                      {.finished = [&] { return false; },
                       .asyncError =
                           [&] { return ++round < 3 ? std::string() : std::string("remote process exited (peer 1)"); },
                       .expired = [] { return false; }, .pause = [] {}});
  });
  CHECK(std::string(e.what()) == "ncclAllReduce failed: NCCL reported remote process exited (peer 1)" + siteOf(line));
  CHECK(endsWith(e.where(), "test_nccl_wait.cpp:" + std::to_string(line)));  // the call's, not the wait's
  CHECK(round == 3);
}

TEST_CASE("nccl wait: a collective that never completes times out, naming the call, the timeout and its file:line") {
  int rounds = 0;
  const int line = __LINE__ + 1;
  const NcclCall call = DTRAIN_NCCL_CALL("ncclBroadcast");
  const CommError e = commErrorOf([&] {
    waitForCollective(call, std::chrono::milliseconds(1800000),
                      {.finished = [] { return false; }, .asyncError = [] { return std::string(); },
                       .expired = [&] { return ++rounds == 4; }, .pause = [] {}});
  });
  CHECK(std::string(e.what()) == "ncclBroadcast timed out after 1800000 ms (stalled or dead peer)" + siteOf(line));
  CHECK(rounds == 4);
}

TEST_CASE("nccl wait: a GPU failure seen by the event query fails the call, with CUDA's text and the call's file:line") {
  const int line = __LINE__ + 1;
  const NcclCall call = DTRAIN_NCCL_CALL("ncclAllReduce");
  const CommError e = commErrorOf([&] {
    waitForCollective(
        call, std::chrono::milliseconds(1000),
        {.finished = []() -> bool {
           throw Error("cudaEventQuery failed: an illegal memory access was encountered (lib/gpu/stream.cpp:67)");
         },
         .asyncError = [] { return std::string(); }, .expired = [] { return false; }, .pause = [] {}});
  });
  // CUDA's own check site stays inside; the collective's call site ends the message.
  CHECK(std::string(e.what()) ==
        "ncclAllReduce failed on the GPU: cudaEventQuery failed: an illegal memory access was encountered "
        "(lib/gpu/stream.cpp:67)" +
            siteOf(line));
}

TEST_CASE("nccl wait: a completed operation wins over an error reported in the same round; the real clock bounds it") {
  CHECK_NOTHROW(waitForCollective(DTRAIN_NCCL_CALL("ncclAllReduce"), std::chrono::milliseconds(1),
                                  {.finished = [] { return true; }, .asyncError = [] { return std::string("late"); },
                                   .expired = [] { return true; }, .pause = [] {}}));
  // With a real deadline, as the backend builds it: a stalled collective ends (here after 30 ms).
  const Deadline deadline(std::chrono::milliseconds(30));
  CHECK_THROWS_AS(waitForCollective(DTRAIN_NCCL_CALL("ncclAllReduce"), std::chrono::milliseconds(30),
                                    {.finished = [] { return false; }, .asyncError = [] { return std::string(); },
                                     .expired = [&] { return deadline.expired(); }, .pause = [] {}}),
                  CommError);
}

TEST_CASE("a failed non-blocking NCCL call names the call, NCCL's text and the file:line where it was made") {
  // DTRAIN_NCCL_ISSUE records the call on the line the macro starts, and evaluates to the call's result.
  NcclCall call;
  int made = 0;
  const int line = __LINE__ + 1;
  const int r = DTRAIN_NCCL_ISSUE(call, "ncclAllGather",
                                  (++made, 5));
  CHECK(r == 5);
  CHECK(made == 1);
  CHECK(std::string(call.name) == "ncclAllGather");
  CHECK(call.line == line);
  CHECK(endsWith(call.file, "tests/comm/test_nccl_wait.cpp"));
  // The backend's settle: NCCL's text, then ncclGetLastError's when there is one.
  CommError e = commErrorOf([&] { throwCallFailed(call, "unhandled system error", "socket closed by peer 2"); });
  CHECK(std::string(e.what()) == "ncclAllGather failed: unhandled system error socket closed by peer 2" + siteOf(line));
  CHECK(endsWith(e.where(), "test_nccl_wait.cpp:" + std::to_string(line)));
  CHECK(e.exitCode() == static_cast<int>(ExitCode::kComm));
  e = commErrorOf([&] { throwCallFailed(call, "invalid argument", ""); });
  CHECK(std::string(e.what()) == "ncclAllGather failed: invalid argument" + siteOf(line));  // no stray space
  e = commErrorOf([&] { throwCallError(call, "timed out after 5 ms (a peer did not join or stalled)"); });
  CHECK(std::string(e.what()) == "ncclAllGather timed out after 5 ms (a peer did not join or stalled)" + siteOf(line));
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
