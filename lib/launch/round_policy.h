// The launcher's decisions as pure functions, so that every row of its behaviour is a unit test instead of a
// multi-process scenario (tests/launch/test_round_policy.cpp):
//  - decideRound: what RoundRunner does when something happens during a round (a signal, a worker exit, the
//    round's event, a worker's output closing), given the round's phase and what it knows about its workers;
//  - decideAfterRound: what the agent does once a round is over (exit with which code, restart, re-form).
// Neither does I/O, logs or reads a clock; RoundRunner and Agent carry out what they return.
//
// A round moves through these phases (RoundRunner::transition logs each move at debug level):
//
//   kRunning --a worker fails--> kFailurePending --its report is ready: publish "failed"--.
//      |  '--every local worker exited 0: mark finished--> kFinished                      |
//      |                                                      |                           |
//      '------------------ the round's event (from any node) -+---------------------------+--> kStopping
//                                                                                               |
//                                     kDone <--output closed-- kDraining <--every worker reaped-'
//
// (kStopping, kDraining and kDone are skipped through at once when nothing is left to wait for.)
#pragma once

#include <optional>
#include <string_view>

#include "rendezvous/rendezvous.h"

namespace dtrain::launch {

enum class RoundPhase {
  kRunning,         // workers running; the round has no outcome yet
  kFailurePending,  // a local worker failed; its stderr gets a short grace so that "failed" can quote it
  kFinished,        // every local worker exited 0 and this node marked itself finished; waiting for the group
  kStopping,        // the round has its outcome; running workers have been told to stop and are being reaped
  kDraining,        // every worker is reaped; their output pipes get a bounded grace (kDrainGrace) to close
  kDone,            // reaped and drained: the round's event loop stops
};

std::string_view roundPhaseName(RoundPhase phase);
// True once the round has its outcome (kStopping, kDraining, kDone).
bool roundEnded(RoundPhase phase);

struct RoundState {
  RoundPhase phase = RoundPhase::kRunning;
  // SIGINT/SIGTERM reached the agent (or SIGUSR1, once a worker exited after a preemption warning): the agent
  // exits with 128+signal whatever the round's outcome.
  std::optional<int> interruptedBy;
  // SIGUSR1 was forwarded to the workers: from then on a worker that the signal stops (killed by it, or exit
  // code 128+SIGUSR1) ends the job as a "shutdown" (no restart consumed) instead of counting as a failure.
  std::optional<int> preemptedBy;
};

// What the runner knows about its local workers when an input arrives, the input's own effect included (the
// worker being reaped counts as exited; the pipe that closed counts as closed).
struct LocalWorkers {
  bool allExited = false;
  bool allSucceeded = false;  // all exited, each with exit code 0
  bool drained = false;       // every worker's stdout and stderr pipe is closed
};

struct RoundInput {
  enum class Kind {
    kSignal,         // SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 reached the agent
    kWorkerExit,     // a worker was reaped
    kRoundEvent,     // the round's event: seen in the store, won by our own publish, or a local store failure
    kFailureReport,  // the failed worker's stderr closed, or the grace for it ran out
    kOutputClosed,   // a worker's stdout or stderr pipe closed (or the drain grace closed it)
  };
  Kind kind = Kind::kOutputClosed;
  int signal = 0;                  // kSignal
  int status = 0;                  // kWorkerExit: the waitpid status
  bool stderrOpen = false;         // kWorkerExit: the worker's stderr pipe is still open
  rendezvous::RoundEventType eventType = rendezvous::RoundEventType::kFailed;  // kRoundEvent
  int eventExitCode = 0;                                                       // kRoundEvent
  LocalWorkers workers;

  static RoundInput signalled(int sig, LocalWorkers w = {}) { return {Kind::kSignal, sig, 0, false, {}, 0, w}; }
  static RoundInput workerExited(int status, bool stderrOpen, LocalWorkers w) {
    return {Kind::kWorkerExit, 0, status, stderrOpen, {}, 0, w};
  }
  static RoundInput roundEvent(rendezvous::RoundEventType type, int exitCode, LocalWorkers w) {
    return {Kind::kRoundEvent, 0, 0, false, type, exitCode, w};
  }
  static RoundInput failureReport(LocalWorkers w) { return {Kind::kFailureReport, 0, 0, false, {}, 0, w}; }
  static RoundInput outputClosed(LocalWorkers w) { return {Kind::kOutputClosed, 0, 0, false, {}, 0, w}; }
};

// The event this node asks the group to end the round with (the first one published wins, see rendezvous.h).
enum class Publish {
  kNone,
  kShutdown,           // "shutdown", exit code 128+interruptedBy: this agent was signalled
  kPreemptedShutdown,  // "shutdown", exit code 128+preemptedBy: a worker stopped after the preemption warning
  kFailure,            // "failed", with the failed worker's exit code and report
};

struct RoundActions {
  RoundState next;               // the state after the input (the phase may be unchanged)
  int forwardSignal = 0;         // pass this signal on to every running worker; the round goes on
  // Signal every running worker's process group with this: SIGKILL stops them at once; 0 sends nothing (they
  // were already signalled) but still starts the grace.
  std::optional<int> stopSignal;
  bool armKillTimer = false;     // SIGKILL whoever still runs after --shutdown-timeout
  bool waitForReport = false;    // the failed worker's stderr is open: publish once it closes, or after a grace
  bool markFinished = false;     // tell the group that this node's workers all succeeded
  Publish publish = Publish::kNone;
  bool endsRound = false;        // kRoundEvent only: the event is the round's outcome (the first one wins)
  bool armDrainTimer = false;    // entering kDraining: bound the wait for the output pipes
};

// The single source of RoundRunner's behaviour. Rules, in the order they are checked:
//  signal SIGUSR1/SIGUSR2   forward it to the workers (SIGUSR1 also sets preemptedBy); nothing else changes.
//  signal SIGINT/SIGTERM    first one: interruptedBy = sig and publish kShutdown; a second one (or one after a
//                           preemption ended the round): SIGKILL every worker, no grace.
//  worker exit              once the round ended: only the drain bookkeeping. Else after SIGUSR1, when the
//                           signal stopped the worker (killed by SIGUSR1, or exit code 128+SIGUSR1 = 138 as
//                           dtrain's trainer exits after its checkpoint): publish kPreemptedShutdown (and
//                           interruptedBy = SIGUSR1); any other exit is judged as if no SIGUSR1 came (a worker
//                           that handles it and finishes with 0 succeeded; a failure keeps its report and the
//                           restart policy). Else a non-zero exit (or a
//                           signal) while kRunning: kFailurePending, and publish kFailure now if its stderr is
//                           already closed, otherwise wait for it. Else exit 0 making every local worker
//                           successful while kRunning: kFinished and mark finished.
//  round event              ignored once the round ended. Otherwise it ends the round (kStopping) and stops the
//                           workers: with SIGKILL after node_lost (they are stuck in collectives with the lost
//                           node and can commit no checkpoint); with SIGUSR1 after a preemption shutdown from
//                           another node (so they checkpoint), or no new signal when this agent already
//                           forwarded SIGUSR1; else with the agent's own SIGINT/SIGTERM, or SIGTERM. Each stop
//                           but SIGKILL starts the --shutdown-timeout grace. "done" stops nothing.
//  failure report ready     while kFailurePending: publish kFailure.
//  output closed            the drain bookkeeping.
// Drain bookkeeping, once the round ended and every worker is reaped: kDone when every pipe is closed, else
// kDraining (arming the drain grace on entry).
RoundActions decideRound(const RoundState& state, const RoundInput& input);

// What the agent does once a round is over.
enum class RoundVerdict {
  kInterrupted,  // the agent was signalled: exit 128+signal
  kSucceeded,    // "done": exit 0
  kShutdown,     // another agent was signalled, or a worker stopped after preemption: exit with its code
  kConfigError,  // a worker exited 2 (configuration error): a restart would fail the same way; exit 2
  kGiveUp,       // a failure with no restart left: exit with the failed worker's code
  kRestart,      // a failure with restarts left: advance and restart the workers
  kReform,       // membership change: advance and re-form the group, no restart consumed
  kStoreLost,    // this agent lost the rendezvous store: nothing to restart or re-form through; exit 4
};

struct AfterRound {
  RoundVerdict verdict = RoundVerdict::kRestart;
  int exitCode = 0;  // the process exit code when exits()
  bool exits() const { return verdict != RoundVerdict::kRestart && verdict != RoundVerdict::kReform; }
};

// `restartCount`: failure restarts before this round; `maxRestarts`: --max-restarts; `storeLost`: the round
// ended because this agent could not reach the store (RoundRunner::lostStore), which no restart can cure.
AfterRound decideAfterRound(const rendezvous::RoundEvent& event, std::optional<int> interruptedBy,
                            int restartCount, int maxRestarts, bool storeLost = false);

// The deadline of every single store call the agent makes (not of the waits that have their own timeout): a
// healthy store answers in milliseconds, so a call that takes longer than the heartbeat timeout (at least 5 s,
// so that a loaded store is not taken for a dead one) means the store or its host is gone or frozen. Never more
// than --rdzv-timeout.
rendezvous::Millis storeCallTimeout(rendezvous::Millis heartbeatTimeout, rendezvous::Millis rdzvTimeout);

}  // namespace dtrain::launch
