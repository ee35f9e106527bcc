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

#include <chrono>
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
  // A stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) reached the agent (or SIGUSR1, once a worker exited after a
  // preemption warning): the agent exits with 128+signal whatever the round's outcome.
  std::optional<int> interruptedBy;
  // SIGUSR1 was forwarded to the workers: from then on a worker that the signal stops (killed by it, or exit
  // code 128+SIGUSR1) ends the job as a "shutdown" (no restart consumed) instead of counting as a failure.
  std::optional<int> preemptedBy;
  // The round spans several nodes (fixed for the round): a local worker's collective failure (exit 7) is then
  // usually a symptom of something on another node, see rootCauseGrace.
  bool multiNode = false;
  // kFailurePending with a secondary failure: the local worker exited 7 (its collective failed: a peer was
  // lost) in a multi-node round, or on one node while another local worker still runs. Its report is held for the
  // root-cause grace (heartbeat timeout + 2 heartbeat intervals), so that the real cause wins the round's event:
  // another node's failed worker, node_lost when a node died (which an elastic job survives by re-forming, where a
  // "failed" would be a failure), or the local worker whose exit broke the collective but was reaped later. On one
  // node the hold ends as soon as every local worker has exited.
  bool rootCauseGrace = false;
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
    kFailureReport,  // the failed worker's stderr closed, or the grace for it (or the root-cause grace) ran out
    kOutputClosed,   // a worker's stdout or stderr pipe closed (or the drain grace closed it)
  };
  Kind kind = Kind::kOutputClosed;
  int signal = 0;                  // kSignal
  int status = 0;                  // kWorkerExit: the waitpid status
  bool stderrOpen = false;         // kWorkerExit: the worker's stderr pipe is still open
  rendezvous::RoundEventType eventType = rendezvous::RoundEventType::kFailed;  // kRoundEvent
  int eventExitCode = 0;                                                       // kRoundEvent
  LocalWorkers workers;
  bool graceOver = false;          // kFailureReport: the root-cause grace ran out (not only the stderr)
  // kSignal: the time since the agent read its first stop signal of the round (not set for the first one).
  // A repeat within kRepeatedStopWindow is the same request delivered twice, not a second Ctrl-C.
  std::optional<std::chrono::milliseconds> sinceFirstStop;

  static RoundInput signalled(int sig, LocalWorkers w = {},
                              std::optional<std::chrono::milliseconds> sinceFirstStop = std::nullopt) {
    return {Kind::kSignal, sig, 0, false, {}, 0, w, false, sinceFirstStop};
  }
  static RoundInput workerExited(int status, bool stderrOpen, LocalWorkers w) {
    return {Kind::kWorkerExit, 0, status, stderrOpen, {}, 0, w, false, std::nullopt};
  }
  static RoundInput roundEvent(rendezvous::RoundEventType type, int exitCode, LocalWorkers w) {
    return {Kind::kRoundEvent, 0, 0, false, type, exitCode, w, false, std::nullopt};
  }
  static RoundInput failureReport(LocalWorkers w, bool graceOver = false) {
    return {Kind::kFailureReport, 0, 0, false, {}, 0, w, graceOver, std::nullopt};
  }
  static RoundInput outputClosed(LocalWorkers w) {
    return {Kind::kOutputClosed, 0, 0, false, {}, 0, w, false, std::nullopt};
  }
};

// A stop signal that comes again within this time of the first is one request delivered twice, not the user's
// second Ctrl-C: timeout(1) signals its child and then its whole process group (two SIGTERMs within
// microseconds when its time runs out), and `kill -- -PGID` after a kill of the agent does the same. Escalating on
// those to SIGKILL cost the workers their stop checkpoint. A person pressing Ctrl-C again takes longer than this.
inline constexpr std::chrono::milliseconds kRepeatedStopWindow{1000};

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
  bool armRootCauseTimer = false;  // a secondary failure: publish it after the root-cause grace (failureReport
                                   // with graceOver) unless the round's event comes first
  bool newRootCause = false;     // the exiting worker replaces the one held in the root-cause grace as the failure
  bool markFinished = false;     // tell the group that this node's workers all succeeded
  Publish publish = Publish::kNone;
  bool endsRound = false;        // kRoundEvent only: the event is the round's outcome (the first one wins)
  bool armDrainTimer = false;    // entering kDraining: bound the wait for the output pipes
};

// The single source of RoundRunner's behaviour. Rules, in the order they are checked:
//  signal SIGUSR1/SIGUSR2   forward it to the workers (SIGUSR1 also sets preemptedBy); nothing else changes.
//  signal SIGINT/SIGTERM    (and SIGHUP/SIGQUIT, torchrun's other stop signals, when the agent honours them)
//                           first one: interruptedBy = sig and publish kShutdown; a second one (or one after a
//                           preemption ended the round): SIGKILL every worker, no grace, unless it came within
//                           kRepeatedStopWindow of the first (sinceFirstStop): then it changes nothing.
//  worker exit              once the round ended: only the drain bookkeeping. Else after SIGUSR1, when the
//                           signal stopped the worker (killed by SIGUSR1, or exit code 128+SIGUSR1 = 138 as
//                           dtrain's trainer exits after its checkpoint): publish kPreemptedShutdown (and
//                           interruptedBy = SIGUSR1); any other exit is judged as if no SIGUSR1 came (a worker
//                           that handles it and finishes with 0 succeeded; a failure keeps its report and the
//                           restart policy). Else a non-zero exit (or a
//                           signal) while kRunning: kFailurePending; a secondary failure (exit 7 in a multi-node
//                           round, or on one node with another local worker running) holds its report for the
//                           root-cause grace (rootCauseGrace, armRootCauseTimer; on one node it is published once
//                           every local worker has exited);
//                           any other publishes kFailure now if its stderr is already closed, otherwise waits for
//                           it. A non-secondary failure during the root-cause grace becomes the failure instead
//                           (newRootCause). Else exit 0 making every local worker successful while kRunning:
//                           kFinished and mark finished.
//  round event              ignored once the round ended. Otherwise it ends the round (kStopping) and stops the
//                           workers: with SIGKILL after node_lost (they are stuck in collectives with the lost
//                           node and can commit no checkpoint); with SIGUSR1 after a preemption shutdown from
//                           another node (so they checkpoint), or no new signal when this agent already
//                           forwarded SIGUSR1; else with the agent's own SIGINT/SIGTERM, or SIGTERM (also after SIGHUP/SIGQUIT). Each stop
//                           but SIGKILL starts the --shutdown-timeout grace. "done" stops nothing.
//  failure report ready     while kFailurePending: publish kFailure (in the root-cause grace only once it ran out).
//  output closed            the drain bookkeeping.
// Drain bookkeeping, once the round ended and every worker is reaped: kDone when every pipe is closed, else
// kDraining (arming the drain grace on entry).
RoundActions decideRound(const RoundState& state, const RoundInput& input);

// What the agent does once a round is over.
enum class RoundVerdict {
  kInterrupted,    // the agent was signalled: exit 128+signal
  kSucceeded,      // "done": exit 0
  kShutdown,       // another agent was signalled, or a worker stopped after preemption: exit with its code
  kConfigError,    // a worker exited 2 (configuration error), or a dtrain worker 3 (usage error): a restart would
                   // fail the same way; exit with that code
  kGiveUp,         // a failure with no restart left: exit with the failed worker's code
  kRestart,        // a failure with restarts left: advance and restart the workers
  kReform,         // membership change: advance and re-form the group, no restart consumed
  kTooManyReforms, // a membership change with no re-formation left (--max-reforms): exit 4
  kStoreLost,      // this agent lost the rendezvous store: nothing to restart or re-form through; exit 4
};

struct AfterRound {
  RoundVerdict verdict = RoundVerdict::kRestart;
  int exitCode = 0;  // the process exit code when exits()
  bool exits() const { return verdict != RoundVerdict::kRestart && verdict != RoundVerdict::kReform; }
};

// The job's budget of restarts and re-formations, as the store counts them before this round.
struct RestartBudget {
  int restartCount = 0;  // failure restarts before this round (RoundInfo::restartCount)
  int maxRestarts = 0;   // --max-restarts
  int reformCount = 0;   // re-formations before this round (RoundInfo::reformCount)
  int maxReforms = 100;  // --max-reforms
  bool elastic = false;  // --nnodes MIN:MAX with MIN < MAX
};

// The rules, in order: a job that completed exits 0 even when a signal reached the agent at its end ("done":
// every node's workers exited 0 before the signal decided anything; or `workersCompleted`, see below), as
// torchrun returns its worker group's SUCCEEDED result once it has seen it; otherwise the agent's own signal
// decides its exit (128+signal); a lost store exits 4; "done" exits 0; "shutdown" exits with its code; a worker's
// exit code 2 is a configuration error (never restarted), and so is exit code 3 when `dtrainWorkers` (the workers
// are this dtrain: LaunchOptions::dtrainWorkers), for which it is a usage error (README's exit-code table).
// Membership changes are not failures: a node asking to join, and - in an elastic job (MIN < MAX) - a node lost
// (missed heartbeats), re-form the group without consuming a restart, like Horovod's elastic mode; the survivors'
// next round closes with whatever count is in range (below MIN it waits --rdzv-timeout for nodes to come back).
// Flapping (nodes leaving and joining over and over) is bounded by --max-reforms (Horovod's --reset-limit):
// past it the agent exits 4 naming the flag. Any other failure (a worker failed; a node lost in a fixed-size job)
// restarts while restartCount < maxRestarts, else gives up with the failure's exit code.
// `storeLost`: the round ended because this agent could not reach the store (RoundRunner::lostStore), which no
// restart can cure. `workersCompleted`: the round had one node and its workers completed their work although the
// signal came (RoundRunner::workersCompletedDespiteSignal: e.g. Ctrl-C while rank 0 exits with the model written);
// the agent knows no other node's workers, so with several nodes only "done" says the job completed.
AfterRound decideAfterRound(const rendezvous::RoundEvent& event, std::optional<int> interruptedBy,
                            const RestartBudget& budget, bool storeLost = false, bool workersCompleted = false,
                            bool dtrainWorkers = false);

// The deadline of every single store call the agent makes (not of the waits that have their own timeout): a
// healthy store answers in milliseconds, so a call that takes longer than the heartbeat timeout (at least 5 s,
// so that a loaded store is not taken for a dead one) means the store or its host is gone or frozen. Never more
// than --rdzv-timeout.
rendezvous::Millis storeCallTimeout(rendezvous::Millis heartbeatTimeout, rendezvous::Millis rdzvTimeout);

}  // namespace dtrain::launch
