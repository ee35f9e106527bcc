// The launcher's decision table (lib/launch/round_policy.h), row by row: what RoundRunner does on each signal,
// worker exit and round event, and what the agent does after each outcome. The multi-process tests
// (tests/integration/test_launch*.cpp, test_fault_tolerance.cpp, test_elastic.cpp) check the same behaviour
// end to end.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>

#include "lib/common/error.h"
#include "lib/launch/round_policy.h"

using namespace dtrain;
using namespace dtrain::launch;
using rendezvous::RoundEvent;
using rendezvous::RoundEventType;

namespace {

int exitStatus(int code) { return W_EXITCODE(code, 0); }
int killedBy(int sig) { return sig; }  // waitpid's status for a child terminated by `sig` (no core dump)

// Worker facts: some still running; all reaped but output still open; all reaped and drained.
constexpr LocalWorkers kSomeRunning{false, false, false};
constexpr LocalWorkers kReapedOpen{true, false, false};
constexpr LocalWorkers kReapedDrained{true, false, true};
constexpr LocalWorkers kAllSucceededOpen{true, true, false};

RoundState at(RoundPhase phase, std::optional<int> interruptedBy = {}, std::optional<int> preemptedBy = {}) {
  RoundState s;
  s.phase = phase;
  s.interruptedBy = interruptedBy;
  s.preemptedBy = preemptedBy;
  return s;
}

RoundActions event(const RoundState& s, RoundEventType type, int exitCode = 0, LocalWorkers w = kSomeRunning) {
  return decideRound(s, RoundInput::roundEvent(type, exitCode, w));
}

// Nothing to do besides (possibly) the new state.
void checkQuiet(const RoundActions& a) {
  CHECK(a.forwardSignal == 0);
  CHECK_FALSE(a.stopSignal.has_value());
  CHECK_FALSE(a.armKillTimer);
  CHECK_FALSE(a.waitForReport);
  CHECK_FALSE(a.markFinished);
  CHECK(a.publish == Publish::kNone);
  CHECK_FALSE(a.endsRound);
  CHECK_FALSE(a.armDrainTimer);
  CHECK_FALSE(a.armRootCauseTimer);
  CHECK_FALSE(a.newRootCause);
}

}  // namespace

TEST_CASE("round policy: phases are named and the last three are the ended ones") {
  CHECK(roundPhaseName(RoundPhase::kFailurePending) == "failure pending");
  CHECK_FALSE(roundEnded(RoundPhase::kRunning));
  CHECK_FALSE(roundEnded(RoundPhase::kFailurePending));
  CHECK_FALSE(roundEnded(RoundPhase::kFinished));
  CHECK(roundEnded(RoundPhase::kStopping));
  CHECK(roundEnded(RoundPhase::kDraining));
  CHECK(roundEnded(RoundPhase::kDone));
}

TEST_CASE("round policy: a worker exiting 0 while others run changes nothing") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(exitStatus(0), false, kSomeRunning));
  CHECK(a.next.phase == RoundPhase::kRunning);
  checkQuiet(a);
}

TEST_CASE("round policy: the last worker exiting 0 marks the node finished, and the group's done ends the round") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(exitStatus(0), true, kAllSucceededOpen));
  CHECK(a.next.phase == RoundPhase::kFinished);
  CHECK(a.markFinished);
  CHECK(a.publish == Publish::kNone);
  CHECK_FALSE(a.stopSignal.has_value());

  SUBCASE("done with output still open: drain, with a bounded grace") {
    auto d = event(a.next, RoundEventType::kDone, 0, kAllSucceededOpen);
    CHECK(d.endsRound);
    CHECK(d.next.phase == RoundPhase::kDraining);
    CHECK(d.armDrainTimer);
    CHECK_FALSE(d.stopSignal.has_value());  // nobody left to stop
    CHECK_FALSE(d.armKillTimer);
    auto closed = decideRound(d.next, RoundInput::outputClosed({true, true, true}));
    CHECK(closed.next.phase == RoundPhase::kDone);
    CHECK_FALSE(closed.armDrainTimer);
  }
  SUBCASE("done with output drained: the round is over at once") {
    auto d = event(a.next, RoundEventType::kDone, 0, {true, true, true});
    CHECK(d.endsRound);
    CHECK(d.next.phase == RoundPhase::kDone);
    CHECK_FALSE(d.armDrainTimer);
  }
  SUBCASE("a failure elsewhere ends it the same way as any event") {
    auto f = event(a.next, RoundEventType::kFailed, 1, kAllSucceededOpen);
    CHECK(f.endsRound);
    CHECK(f.next.phase == RoundPhase::kDraining);
    CHECK(f.stopSignal == SIGTERM);
  }
}

TEST_CASE("round policy: a failed worker whose stderr is closed is published at once") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(exitStatus(3), false, kSomeRunning));
  CHECK(a.next.phase == RoundPhase::kFailurePending);
  CHECK(a.publish == Publish::kFailure);
  CHECK_FALSE(a.waitForReport);
  CHECK_FALSE(a.stopSignal.has_value());  // stopping waits for the round's event
}

TEST_CASE("round policy: a failed worker with open stderr waits for its report, once") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(killedBy(SIGSEGV), true, kSomeRunning));
  CHECK(a.next.phase == RoundPhase::kFailurePending);
  CHECK(a.waitForReport);
  CHECK(a.publish == Publish::kNone);

  // A second failure is not the root cause: nothing new.
  auto second = decideRound(a.next, RoundInput::workerExited(exitStatus(1), false, kSomeRunning));
  CHECK(second.next.phase == RoundPhase::kFailurePending);
  checkQuiet(second);
  // Nor is a success.
  checkQuiet(decideRound(a.next, RoundInput::workerExited(exitStatus(0), false, kSomeRunning)));

  auto report = decideRound(a.next, RoundInput::failureReport(kSomeRunning));
  CHECK(report.publish == Publish::kFailure);
  CHECK(report.next.phase == RoundPhase::kFailurePending);  // the published event moves it on

  auto ended = event(a.next, RoundEventType::kFailed, 3);
  CHECK(ended.endsRound);
  CHECK(ended.next.phase == RoundPhase::kStopping);
  CHECK(ended.stopSignal == SIGTERM);
  CHECK(ended.armKillTimer);
}

TEST_CASE("round policy: a lost peer (exit 7) in a multi-node round waits for the root cause before publishing") {
  RoundState multi = at(RoundPhase::kRunning);
  multi.multiNode = true;
  auto a = decideRound(multi, RoundInput::workerExited(exitStatus(7), false, kSomeRunning));
  CHECK(a.next.phase == RoundPhase::kFailurePending);
  CHECK(a.next.rootCauseGrace);
  CHECK(a.armRootCauseTimer);
  CHECK(a.publish == Publish::kNone);
  // Its stderr closing does not publish it; the grace running out does.
  checkQuiet(decideRound(a.next, RoundInput::failureReport(kSomeRunning)));
  auto late = decideRound(a.next, RoundInput::failureReport(kSomeRunning, /*graceOver=*/true));
  CHECK(late.publish == Publish::kFailure);
  CHECK_FALSE(late.next.rootCauseGrace);
  // node_lost from the heartbeats comes first: it is the outcome, the held failure is dropped.
  auto lost = event(a.next, RoundEventType::kNodeLost, 4);
  CHECK(lost.endsRound);
  CHECK(lost.stopSignal == SIGKILL);
  checkQuiet(decideRound(lost.next, RoundInput::failureReport(kSomeRunning, true)));
}

TEST_CASE("round policy: during the root-cause grace a real local failure becomes the failure") {
  RoundState held = at(RoundPhase::kFailurePending);
  held.multiNode = true;
  held.rootCauseGrace = true;
  auto a = decideRound(held, RoundInput::workerExited(killedBy(SIGSEGV), true, kSomeRunning));
  CHECK(a.newRootCause);
  CHECK(a.waitForReport);
  CHECK_FALSE(a.next.rootCauseGrace);
  CHECK(decideRound(a.next, RoundInput::failureReport(kSomeRunning)).publish == Publish::kFailure);
  // Another lost peer changes nothing.
  checkQuiet(decideRound(held, RoundInput::workerExited(exitStatus(7), false, kSomeRunning)));
}

TEST_CASE("round policy: on a single node, exit 7 waits for the local worker that broke the collective") {
  // Rank 1 exits 5, rank 0's all-reduce loses it and exits 7; the agent may reap rank 0 first.
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(exitStatus(7), false, kSomeRunning));
  CHECK(a.next.phase == RoundPhase::kFailurePending);
  CHECK(a.next.rootCauseGrace);
  CHECK(a.armRootCauseTimer);
  CHECK(a.publish == Publish::kNone);
  SUBCASE("the real cause, reaped next, becomes the failure") {
    auto cause = decideRound(a.next, RoundInput::workerExited(exitStatus(5), false, kReapedOpen));
    CHECK(cause.newRootCause);
    CHECK(cause.publish == Publish::kFailure);
    CHECK_FALSE(cause.next.rootCauseGrace);
  }
  SUBCASE("every other worker exits without failing: the held one is published at once") {
    auto rest = decideRound(a.next, RoundInput::workerExited(exitStatus(0), false, kReapedOpen));
    CHECK_FALSE(rest.newRootCause);
    CHECK(rest.publish == Publish::kFailure);
    CHECK_FALSE(rest.next.rootCauseGrace);
    CHECK_FALSE(rest.armRootCauseTimer);
  }
  SUBCASE("another lost peer, the last to exit, publishes the held one") {
    auto rest = decideRound(a.next, RoundInput::workerExited(exitStatus(7), false, kReapedOpen));
    CHECK_FALSE(rest.newRootCause);
    CHECK(rest.publish == Publish::kFailure);
  }
  SUBCASE("the other worker hangs: the grace running out publishes it") {
    CHECK(decideRound(a.next, RoundInput::failureReport(kSomeRunning, /*graceOver=*/true)).publish == Publish::kFailure);
  }
}

TEST_CASE("round policy: on a single node, exit 7 from the last local worker is published at once") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::workerExited(exitStatus(7), false, kReapedOpen));
  CHECK(a.publish == Publish::kFailure);
  CHECK_FALSE(a.armRootCauseTimer);
}

TEST_CASE("round policy: another node's event while our failure report is pending wins, and ours is dropped") {
  RoundState pending = at(RoundPhase::kFailurePending);
  auto a = event(pending, RoundEventType::kNodeLost, static_cast<int>(ExitCode::kRendezvous));
  CHECK(a.next.phase == RoundPhase::kStopping);
  checkQuiet(decideRound(a.next, RoundInput::failureReport(kSomeRunning)));
}

TEST_CASE("round policy: SIGTERM publishes a shutdown and the workers get SIGTERM with the grace") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGTERM));
  CHECK(a.next.interruptedBy == SIGTERM);
  CHECK(a.publish == Publish::kShutdown);
  CHECK_FALSE(a.stopSignal.has_value());
  CHECK(a.next.phase == RoundPhase::kRunning);

  auto won = event(a.next, RoundEventType::kShutdown, 128 + SIGTERM);
  CHECK(won.endsRound);
  CHECK(won.next.phase == RoundPhase::kStopping);
  CHECK(won.stopSignal == SIGTERM);
  CHECK(won.armKillTimer);

  SUBCASE("if a failure won the race, the workers still get the agent's own signal") {
    auto lost = event(at(RoundPhase::kRunning, SIGINT), RoundEventType::kFailed, 1);
    CHECK(lost.stopSignal == SIGINT);
    CHECK(lost.next.interruptedBy == SIGINT);
  }
}

TEST_CASE("round policy: SIGHUP and SIGQUIT stop the job, and the workers get SIGTERM; the exit is 128+signal") {
  for (int sig : {SIGHUP, SIGQUIT}) {
    CAPTURE(sig);
    auto a = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(sig));
    CHECK(a.next.interruptedBy == sig);
    CHECK(a.publish == Publish::kShutdown);
    auto won = event(a.next, RoundEventType::kShutdown, 128 + sig);
    CHECK(won.stopSignal == SIGTERM);
    CHECK(won.armKillTimer);
    rendezvous::RoundEvent shutdown;
    shutdown.type = RoundEventType::kShutdown;
    shutdown.exitCode = 128 + sig;
    CHECK(decideAfterRound(shutdown, sig, {0, 3}).exitCode == 128 + sig);
  }
}

TEST_CASE("round policy: SIGINT is passed on as SIGINT; a second SIGINT kills at once") {
  auto first = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGINT));
  CHECK(first.publish == Publish::kShutdown);
  auto stopping = event(first.next, RoundEventType::kShutdown, 128 + SIGINT);
  CHECK(stopping.stopSignal == SIGINT);
  CHECK(stopping.armKillTimer);

  auto second = decideRound(stopping.next, RoundInput::signalled(SIGINT));
  CHECK(second.stopSignal == SIGKILL);
  CHECK_FALSE(second.armKillTimer);
  CHECK(second.publish == Publish::kNone);
  CHECK(second.next.interruptedBy == SIGINT);  // the agent still exits 128+SIGINT
  CHECK(second.next.phase == RoundPhase::kStopping);
}

TEST_CASE("round policy: a stop signal repeated within kRepeatedStopWindow is the same request, not a second Ctrl-C") {
  // timeout(1) sends SIGTERM to its child and then to its process group: two at once, which must not cost the
  // workers their grace (and their stop checkpoint).
  auto first = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGTERM));
  auto stopping = event(first.next, RoundEventType::kShutdown, 128 + SIGTERM);
  for (int sig : {SIGTERM, SIGINT}) {
    CAPTURE(sig);
    auto repeat = decideRound(stopping.next, RoundInput::signalled(sig, {}, std::chrono::milliseconds(3)));
    CHECK_FALSE(repeat.stopSignal.has_value());
    CHECK(repeat.publish == Publish::kNone);
    CHECK(repeat.next.interruptedBy == SIGTERM);
    // Before the round's event too (the shutdown is published, not yet seen).
    auto early = decideRound(first.next, RoundInput::signalled(sig, {}, kRepeatedStopWindow - std::chrono::milliseconds(1)));
    CHECK_FALSE(early.stopSignal.has_value());
    CHECK(early.publish == Publish::kNone);
    // A person's second Ctrl-C, later: no more grace.
    auto later = decideRound(stopping.next, RoundInput::signalled(sig, {}, kRepeatedStopWindow));
    CHECK(later.stopSignal == SIGKILL);
  }
}

TEST_CASE("round policy: a signal after the round ended still asks for a shutdown (the store keeps the first)") {
  auto a = decideRound(at(RoundPhase::kDraining), RoundInput::signalled(SIGTERM));
  CHECK(a.publish == Publish::kShutdown);
  CHECK(a.next.interruptedBy == SIGTERM);
  CHECK(a.next.phase == RoundPhase::kDraining);
  CHECK_FALSE(event(a.next, RoundEventType::kShutdown, 128 + SIGTERM).endsRound);
}

TEST_CASE("round policy: SIGUSR1 is forwarded, then a worker's exit is a preemption shutdown") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGUSR1));
  CHECK(a.forwardSignal == SIGUSR1);
  CHECK(a.next.preemptedBy == SIGUSR1);
  CHECK_FALSE(a.next.interruptedBy.has_value());
  CHECK(a.publish == Publish::kNone);
  CHECK_FALSE(a.stopSignal.has_value());

  for (int status : {exitStatus(128 + SIGUSR1), killedBy(SIGUSR1)}) {
    CAPTURE(status);
    auto exit = decideRound(a.next, RoundInput::workerExited(status, true, kSomeRunning));
    CHECK(exit.publish == Publish::kPreemptedShutdown);
    CHECK(exit.next.interruptedBy == SIGUSR1);
    CHECK(exit.next.phase == RoundPhase::kRunning);  // not a failure, not finished
    CHECK_FALSE(exit.markFinished);
    CHECK_FALSE(exit.waitForReport);

    // The workers already have SIGUSR1: no second signal, only SIGKILL after the grace.
    auto won = event(exit.next, RoundEventType::kShutdown, 128 + SIGUSR1);
    CHECK(won.stopSignal == 0);
    CHECK(won.armKillTimer);
    CHECK(won.next.phase == RoundPhase::kStopping);
    // And a Ctrl-C now is a second interrupt: kill.
    CHECK(decideRound(won.next, RoundInput::signalled(SIGINT)).stopSignal == SIGKILL);
  }
}

TEST_CASE("round policy: after SIGUSR1, only a stop the signal caused is a preemption") {
  auto warned = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGUSR1)).next;
  SUBCASE("a worker that fails keeps its report and the restart policy") {
    for (int status : {exitStatus(1), exitStatus(7), killedBy(SIGSEGV), killedBy(SIGTERM)}) {
      CAPTURE(status);
      // (an exit 7 as the last local worker: with one still running it would wait for the root cause, above)
      auto exit = decideRound(warned, RoundInput::workerExited(status, false, status == exitStatus(7) ? kReapedOpen
                                                                                                      : kSomeRunning));
      CHECK(exit.publish == Publish::kFailure);
      CHECK(exit.next.phase == RoundPhase::kFailurePending);
      CHECK_FALSE(exit.next.interruptedBy.has_value());
    }
  }
  SUBCASE("workers that handle it and finish with 0 succeed") {
    auto one = decideRound(warned, RoundInput::workerExited(exitStatus(0), false, kSomeRunning));
    CHECK(one.publish == Publish::kNone);
    CHECK(one.next.phase == RoundPhase::kRunning);
    CHECK_FALSE(one.next.interruptedBy.has_value());
    LocalWorkers all{true, true, true};
    auto last = decideRound(warned, RoundInput::workerExited(exitStatus(0), false, all));
    CHECK(last.markFinished);
    CHECK(last.next.phase == RoundPhase::kFinished);
    CHECK_FALSE(last.next.interruptedBy.has_value());
  }
}

TEST_CASE("round policy: SIGUSR2 is only forwarded; a worker exit afterwards is judged as usual") {
  auto a = decideRound(at(RoundPhase::kRunning), RoundInput::signalled(SIGUSR2));
  CHECK(a.forwardSignal == SIGUSR2);
  CHECK_FALSE(a.next.preemptedBy.has_value());
  auto exit = decideRound(a.next, RoundInput::workerExited(exitStatus(1), false, kSomeRunning));
  CHECK(exit.publish == Publish::kFailure);
}

TEST_CASE("round policy: a preemption shutdown from another node sends our workers SIGUSR1") {
  auto a = event(at(RoundPhase::kRunning), RoundEventType::kShutdown, 128 + SIGUSR1);
  CHECK(a.endsRound);
  CHECK(a.stopSignal == SIGUSR1);
  CHECK(a.armKillTimer);
  CHECK_FALSE(a.next.interruptedBy.has_value());  // the agent exits with the event's code
}

TEST_CASE("round policy: a Ctrl-C shutdown from another node stops our workers with SIGTERM") {
  auto a = event(at(RoundPhase::kRunning), RoundEventType::kShutdown, 128 + SIGINT);
  CHECK(a.stopSignal == SIGTERM);
  CHECK(a.armKillTimer);
}

TEST_CASE("round policy: node_lost kills the workers at once, whatever else happened") {
  for (auto s : {at(RoundPhase::kRunning), at(RoundPhase::kRunning, SIGINT), at(RoundPhase::kRunning, {}, SIGUSR1),
                 at(RoundPhase::kFailurePending)}) {
    auto a = event(s, RoundEventType::kNodeLost, static_cast<int>(ExitCode::kRendezvous));
    CHECK(a.endsRound);
    CHECK(a.stopSignal == SIGKILL);
    CHECK_FALSE(a.armKillTimer);
    CHECK(a.next.phase == RoundPhase::kStopping);
  }
}

TEST_CASE("round policy: membership stops the workers with SIGTERM so the group re-forms") {
  auto a = event(at(RoundPhase::kRunning), RoundEventType::kMembership);
  CHECK(a.stopSignal == SIGTERM);
  CHECK(a.armKillTimer);
}

TEST_CASE("round policy: only the first event ends the round") {
  for (auto phase : {RoundPhase::kStopping, RoundPhase::kDraining}) {
    auto a = event(at(phase), RoundEventType::kNodeLost, 5, kReapedOpen);
    CHECK(a.next.phase == phase);
    checkQuiet(a);
  }
}

TEST_CASE("round policy: after the round ended, reaping and closing output lead to done") {
  RoundState stopping = at(RoundPhase::kStopping);
  // A worker exiting non-zero while stopping is no failure to report.
  auto one = decideRound(stopping, RoundInput::workerExited(killedBy(SIGTERM), true, kSomeRunning));
  CHECK(one.next.phase == RoundPhase::kStopping);
  checkQuiet(one);

  auto last = decideRound(stopping, RoundInput::workerExited(killedBy(SIGTERM), true, kReapedOpen));
  CHECK(last.next.phase == RoundPhase::kDraining);
  CHECK(last.armDrainTimer);
  CHECK(last.publish == Publish::kNone);

  auto partly = decideRound(last.next, RoundInput::outputClosed(kReapedOpen));
  CHECK(partly.next.phase == RoundPhase::kDraining);
  CHECK_FALSE(partly.armDrainTimer);  // armed once

  CHECK(decideRound(last.next, RoundInput::outputClosed(kReapedDrained)).next.phase == RoundPhase::kDone);
  CHECK(decideRound(stopping, RoundInput::workerExited(exitStatus(0), false, kReapedDrained)).next.phase ==
        RoundPhase::kDone);
  // Output closing before the round ended decides nothing.
  checkQuiet(decideRound(at(RoundPhase::kRunning), RoundInput::outputClosed(kReapedDrained)));
}

TEST_CASE("round policy: a preempted worker exiting after the round ended publishes nothing") {
  auto a = decideRound(at(RoundPhase::kStopping, {}, SIGUSR1), RoundInput::workerExited(exitStatus(0), false,
                                                                                        kSomeRunning));
  CHECK(a.publish == Publish::kNone);
  CHECK_FALSE(a.next.interruptedBy.has_value());
}

TEST_CASE("after the round: the agent's own interrupt decides the exit code") {
  RoundEvent shutdown{RoundEventType::kShutdown, "the agent on node 0 received SIGTERM", 128 + SIGTERM, ""};
  auto a = decideAfterRound(shutdown, SIGTERM, {0, 3});
  CHECK(a.verdict == RoundVerdict::kInterrupted);
  CHECK(a.exits());
  CHECK(a.exitCode == 128 + SIGTERM);
  RoundEvent failed{RoundEventType::kFailed, "worker failed", 1, "report"};
  CHECK(decideAfterRound(failed, SIGUSR1, {0, 3}).exitCode == 128 + SIGUSR1);
  CHECK(decideAfterRound(failed, SIGINT, {0, 3}, false, /*workersCompleted=*/false).exitCode == 128 + SIGINT);
}

TEST_CASE("after the round: a signal after every worker finished leaves a completed job at exit 0") {
  // Ctrl-C once the model is written: torchrun returns the group's SUCCEEDED result once it has seen it.
  RoundEvent done{RoundEventType::kDone, "all nodes finished", 0, ""};
  for (int sig : {SIGINT, SIGTERM}) {
    CAPTURE(sig);
    auto a = decideAfterRound(done, sig, {0, 3});
    CHECK(a.verdict == RoundVerdict::kSucceeded);
    CHECK(a.exitCode == 0);
    // On one node, the agent's own shutdown won the round but every worker still exited 0.
    RoundEvent own{RoundEventType::kShutdown, "the agent on node 0 received SIGINT", 128 + sig, ""};
    auto b = decideAfterRound(own, sig, {0, 3}, false, /*workersCompleted=*/true);
    CHECK(b.verdict == RoundVerdict::kSucceeded);
    CHECK(b.exitCode == 0);
  }
  // Without a signal, workers that exited 0 change no other outcome (an elastic re-formation stays one).
  RoundEvent join{RoundEventType::kMembership, "node 1 asks to join", 0, ""};
  CHECK(decideAfterRound(join, std::nullopt, {0, 3}, false, true).verdict == RoundVerdict::kReform);
}

TEST_CASE("after the round: done exits 0, a shutdown exits with its code") {
  auto done = decideAfterRound({RoundEventType::kDone, "", 0, ""}, std::nullopt, {2, 3});
  CHECK(done.verdict == RoundVerdict::kSucceeded);
  CHECK(done.exitCode == 0);
  auto shutdown = decideAfterRound({RoundEventType::kShutdown, "", 128 + SIGUSR1, ""}, std::nullopt, {0, 3});
  CHECK(shutdown.verdict == RoundVerdict::kShutdown);
  CHECK(shutdown.exits());
  CHECK(shutdown.exitCode == 128 + SIGUSR1);
}

TEST_CASE("after the round: failures restart until the restarts run out") {
  RoundEvent failed{RoundEventType::kFailed, "worker failed", 3, "report"};
  auto again = decideAfterRound(failed, std::nullopt, {0, 1});
  CHECK(again.verdict == RoundVerdict::kRestart);
  CHECK_FALSE(again.exits());
  auto out = decideAfterRound(failed, std::nullopt, {1, 1});
  CHECK(out.verdict == RoundVerdict::kGiveUp);
  CHECK(out.exitCode == 3);
  CHECK(decideAfterRound(failed, std::nullopt, {0, 0}).verdict == RoundVerdict::kGiveUp);

  RoundEvent lost{RoundEventType::kNodeLost, "node 1 sent no heartbeat", static_cast<int>(ExitCode::kRendezvous), ""};
  CHECK(decideAfterRound(lost, std::nullopt, {0, 2}).verdict == RoundVerdict::kRestart);
  auto lostOut = decideAfterRound(lost, std::nullopt, {2, 2});
  CHECK(lostOut.verdict == RoundVerdict::kGiveUp);
  CHECK(lostOut.exitCode == static_cast<int>(ExitCode::kRendezvous));
}

TEST_CASE("after the round: a worker's exit code 2 is a configuration error, never restarted") {
  RoundEvent config{RoundEventType::kFailed, "worker failed", static_cast<int>(ExitCode::kConfig), "report"};
  auto a = decideAfterRound(config, std::nullopt, {0, 5});
  CHECK(a.verdict == RoundVerdict::kConfigError);
  CHECK(a.exitCode == 2);
  // node_lost carries the agent's own code, never a worker's: not a configuration error.
  RoundEvent lost{RoundEventType::kNodeLost, "", 2, ""};
  CHECK(decideAfterRound(lost, std::nullopt, {0, 5}).verdict == RoundVerdict::kRestart);
}

TEST_CASE("after the round: exit code 3 of a dtrain worker is a usage error, never restarted; another program's is") {
  RoundEvent usage{RoundEventType::kFailed, "worker failed", static_cast<int>(ExitCode::kUsage), "report"};
  auto own = decideAfterRound(usage, std::nullopt, {0, 5}, false, false, /*dtrainWorkers=*/true);
  CHECK(own.verdict == RoundVerdict::kConfigError);
  CHECK(own.exitCode == 3);
  // A program's own 3 means what that program says: restarted as torchrun restarts any failure.
  CHECK(decideAfterRound(usage, std::nullopt, {0, 5}).verdict == RoundVerdict::kRestart);
  CHECK(decideAfterRound(usage, std::nullopt, {5, 5}).exitCode == 3);
}

TEST_CASE("after the round: a membership change re-forms without consuming a restart") {
  RoundEvent join{RoundEventType::kMembership, "node x asks to join", 0, ""};
  auto a = decideAfterRound(join, std::nullopt, {3, 3});
  CHECK(a.verdict == RoundVerdict::kReform);
  CHECK_FALSE(a.exits());
}

TEST_CASE("after the round: in an elastic job a lost node re-forms the group, whatever --max-restarts says") {
  RoundEvent lost{RoundEventType::kNodeLost, "node 1 sent no heartbeat", static_cast<int>(ExitCode::kRendezvous), ""};
  RestartBudget elastic{.restartCount = 0, .maxRestarts = 0, .reformCount = 0, .maxReforms = 100, .elastic = true};
  auto a = decideAfterRound(lost, std::nullopt, elastic);
  CHECK(a.verdict == RoundVerdict::kReform);
  CHECK_FALSE(a.exits());
  // In a fixed-size job the same loss is a failure: it restarts or gives up with exit 4.
  RestartBudget fixed{.restartCount = 0, .maxRestarts = 0, .reformCount = 0, .maxReforms = 100, .elastic = false};
  auto b = decideAfterRound(lost, std::nullopt, fixed);
  CHECK(b.verdict == RoundVerdict::kGiveUp);
  CHECK(b.exitCode == 4);
  // A worker's failure in an elastic job is still a failure.
  RoundEvent failed{RoundEventType::kFailed, "worker failed", 3, "report"};
  CHECK(decideAfterRound(failed, std::nullopt, elastic).verdict == RoundVerdict::kGiveUp);
}

TEST_CASE("after the round: --max-reforms bounds flapping; past it the agent exits 4") {
  RoundEvent lost{RoundEventType::kNodeLost, "node 1 sent no heartbeat", static_cast<int>(ExitCode::kRendezvous), ""};
  RoundEvent join{RoundEventType::kMembership, "node x asks to join", 0, ""};
  RestartBudget budget{.restartCount = 0, .maxRestarts = 5, .reformCount = 2, .maxReforms = 3, .elastic = true};
  CHECK(decideAfterRound(lost, std::nullopt, budget).verdict == RoundVerdict::kReform);
  budget.reformCount = 3;
  auto a = decideAfterRound(lost, std::nullopt, budget);
  CHECK(a.verdict == RoundVerdict::kTooManyReforms);
  CHECK(a.exits());
  CHECK(a.exitCode == 4);
  CHECK(decideAfterRound(join, std::nullopt, budget).verdict == RoundVerdict::kTooManyReforms);
  // Re-formations and restarts are separate budgets.
  RoundEvent failed{RoundEventType::kFailed, "worker failed", 3, "report"};
  CHECK(decideAfterRound(failed, std::nullopt, budget).verdict == RoundVerdict::kRestart);
}

TEST_CASE("after the round: a lost store ends the job with exit 4, never a restart") {
  RoundEvent lost{RoundEventType::kNodeLost, "lost the rendezvous store at h:1: timed out",
                  static_cast<int>(ExitCode::kRendezvous), ""};
  auto a = decideAfterRound(lost, std::nullopt, {0, 5}, /*storeLost=*/true);
  CHECK(a.verdict == RoundVerdict::kStoreLost);
  CHECK(a.exits());
  CHECK(a.exitCode == 4);
  // A worker failure whose "failed" event could not be published (the store was gone) is no restart either.
  RoundEvent failedLocally{RoundEventType::kNodeLost, "lost the rendezvous store", 4, "worker failed: exit code 7"};
  CHECK(decideAfterRound(failedLocally, std::nullopt, {0, 5}, true).exitCode == 4);
  // The agent's own interrupt still wins.
  CHECK(decideAfterRound(lost, SIGTERM, {0, 5}, true).exitCode == 128 + SIGTERM);
}

TEST_CASE("store calls: the deadline follows the heartbeat timeout, at least 5 s, never past --rdzv-timeout") {
  using std::chrono::milliseconds;
  CHECK(storeCallTimeout(milliseconds(5000), milliseconds(900000)) == milliseconds(5000));
  CHECK(storeCallTimeout(milliseconds(1000), milliseconds(900000)) == milliseconds(5000));
  CHECK(storeCallTimeout(milliseconds(30000), milliseconds(900000)) == milliseconds(30000));
  CHECK(storeCallTimeout(milliseconds(30000), milliseconds(2000)) == milliseconds(2000));
}
