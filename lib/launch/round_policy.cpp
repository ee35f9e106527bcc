#include "lib/launch/round_policy.h"

#include <signal.h>
#include <sys/wait.h>

#include "lib/common/error.h"

namespace dtrain::launch {

using rendezvous::RoundEventType;

std::string_view roundPhaseName(RoundPhase phase) {
  switch (phase) {
    case RoundPhase::kRunning: return "running";
    case RoundPhase::kFailurePending: return "failure pending";
    case RoundPhase::kFinished: return "finished";
    case RoundPhase::kStopping: return "stopping";
    case RoundPhase::kDraining: return "draining";
    case RoundPhase::kDone: return "done";
  }
  return "?";
}

bool roundEnded(RoundPhase phase) {
  return phase == RoundPhase::kStopping || phase == RoundPhase::kDraining || phase == RoundPhase::kDone;
}

namespace {

bool succeeded(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

// Once the round ended and every worker is reaped, the loop ends as soon as their output is drained.
void drainBookkeeping(RoundActions& a, const LocalWorkers& workers) {
  if (!roundEnded(a.next.phase) || !workers.allExited) return;
  if (workers.drained) {
    a.next.phase = RoundPhase::kDone;
  } else if (a.next.phase != RoundPhase::kDraining) {
    a.next.phase = RoundPhase::kDraining;
    a.armDrainTimer = true;
  }
}

void onSignal(const RoundState& s, const RoundInput& in, RoundActions& a) {
  const int sig = in.signal;
  if (sig == SIGUSR1 || sig == SIGUSR2) {
    // Slurm's --signal warning (time limit / preemption ahead): the workers checkpoint; the round goes on.
    // dtrain's own workers answer SIGUSR1 by checkpointing and exiting.
    if (sig == SIGUSR1) a.next.preemptedBy = sig;
    a.forwardSignal = sig;
  } else if (s.interruptedBy) {
    // A second Ctrl-C: no more grace. The same signal delivered twice at once is not one (kRepeatedStopWindow).
    if (!in.sinceFirstStop || *in.sinceFirstStop >= kRepeatedStopWindow) a.stopSignal = SIGKILL;
  } else {
    a.next.interruptedBy = sig;
    a.publish = Publish::kShutdown;
  }
}

// The worker stopped because of `sig`: killed by it (no handler), or exited with 128+sig as dtrain's trainer does
// after checkpointing on SIGUSR1. Any other exit after the warning is judged as usual (0 a success, else a
// failure with its report and the restart policy).
bool stoppedBy(int status, int sig) {
  return (WIFSIGNALED(status) && WTERMSIG(status) == sig) || (WIFEXITED(status) && WEXITSTATUS(status) == 128 + sig);
}

void onWorkerExit(const RoundState& s, const RoundInput& in, RoundActions& a) {
  if (!roundEnded(s.phase)) {
    if (s.preemptedBy && stoppedBy(in.status, *s.preemptedBy)) {
      a.next.interruptedBy = s.preemptedBy;
      a.publish = Publish::kPreemptedShutdown;
    } else if (!succeeded(in.status)) {
      // Exit 7 (its collective failed: a peer was lost) is a symptom when the cause can still show up: on another
      // node, or on this one while another local worker runs (the worker whose exit broke the collective may be
      // reaped after the one that saw it break, so the reaping order does not decide the root cause).
      bool lostPeer = WIFEXITED(in.status) && WEXITSTATUS(in.status) == static_cast<int>(ExitCode::kComm);
      bool secondary = lostPeer && (s.multiNode || !in.workers.allExited);
      bool replacesHeld = s.phase == RoundPhase::kFailurePending && s.rootCauseGrace && !lostPeer;
      if (s.phase == RoundPhase::kRunning && secondary) {
        a.next.phase = RoundPhase::kFailurePending;
        a.next.rootCauseGrace = true;
        a.armRootCauseTimer = true;
      } else if (s.phase == RoundPhase::kRunning || replacesHeld) {
        // The first failure is the root cause the report names (a held secondary one gives way to a real one).
        a.next.phase = RoundPhase::kFailurePending;
        a.next.rootCauseGrace = false;
        a.newRootCause = replacesHeld;
        if (in.stderrOpen) a.waitForReport = true;
        else a.publish = Publish::kFailure;
      }
    } else if (s.phase == RoundPhase::kRunning && in.workers.allSucceeded) {
      a.next.phase = RoundPhase::kFinished;
      a.markFinished = true;
    }
    // One node and every local worker gone: no root cause can come any more, the held secondary one is the failure.
    if (!s.multiNode && a.next.phase == RoundPhase::kFailurePending && a.next.rootCauseGrace && in.workers.allExited) {
      a.next.rootCauseGrace = false;
      a.armRootCauseTimer = false;
      a.publish = Publish::kFailure;
    }
  }
  drainBookkeeping(a, in.workers);
}

void onRoundEvent(const RoundState& s, const RoundInput& in, RoundActions& a) {
  if (roundEnded(s.phase)) return;  // the first event is the outcome
  a.endsRound = true;
  a.next.phase = RoundPhase::kStopping;
  if (in.eventType != RoundEventType::kDone) {
    // Ctrl-C/SIGTERM are passed on as they came; everything else (SIGHUP, SIGQUIT, a preemption's end) stops
    // with SIGTERM, the signal every worker is expected to handle (a worker's SIGHUP/SIGQUIT would kill it without
    // its cleanup, or dump core).
    const bool asCame = s.interruptedBy && (*s.interruptedBy == SIGINT || *s.interruptedBy == SIGTERM);
    int stop = asCame ? *s.interruptedBy : SIGTERM;
    // A preemption on another node ended the round: our workers may not have seen Slurm's SIGUSR1 yet, so they
    // get it now (to checkpoint), and SIGKILL after the grace like any stop. If this agent already forwarded
    // one, the workers are stopping: no second signal, only SIGKILL after the grace.
    if (in.eventType == RoundEventType::kShutdown && in.eventExitCode == 128 + SIGUSR1)
      stop = s.preemptedBy ? 0 : SIGUSR1;
    // After a lost node the workers are stuck in collectives with it and can commit no checkpoint (that needs
    // every rank): there is nothing to wait for, so they are killed at once.
    if (in.eventType == RoundEventType::kNodeLost) stop = SIGKILL;
    a.stopSignal = stop;
    a.armKillTimer = stop != SIGKILL;
  }
  drainBookkeeping(a, in.workers);
}

}  // namespace

RoundActions decideRound(const RoundState& state, const RoundInput& input) {
  RoundActions a;
  a.next = state;
  switch (input.kind) {
    case RoundInput::Kind::kSignal: onSignal(state, input, a); break;
    case RoundInput::Kind::kWorkerExit: onWorkerExit(state, input, a); break;
    case RoundInput::Kind::kRoundEvent: onRoundEvent(state, input, a); break;
    case RoundInput::Kind::kFailureReport:
      if (state.phase == RoundPhase::kFailurePending && (!state.rootCauseGrace || input.graceOver)) {
        a.publish = Publish::kFailure;
        a.next.rootCauseGrace = false;
      }
      break;
    case RoundInput::Kind::kOutputClosed: drainBookkeeping(a, input.workers); break;
  }
  return a;
}

AfterRound decideAfterRound(const rendezvous::RoundEvent& event, std::optional<int> interruptedBy,
                            const RestartBudget& budget, bool storeLost, bool workersCompleted, bool dtrainWorkers) {
  // A signal that came once the work was done stops nothing: the job completed (exit 0, not 128+signal).
  if (interruptedBy && (event.type == RoundEventType::kDone || workersCompleted))
    return {RoundVerdict::kSucceeded, 0};
  if (interruptedBy) return {RoundVerdict::kInterrupted, 128 + *interruptedBy};
  if (storeLost) return {RoundVerdict::kStoreLost, static_cast<int>(ExitCode::kRendezvous)};
  auto reform = [&]() -> AfterRound {
    if (budget.reformCount >= budget.maxReforms)
      return {RoundVerdict::kTooManyReforms, static_cast<int>(ExitCode::kRendezvous)};
    return {RoundVerdict::kReform, 0};
  };
  switch (event.type) {
    case RoundEventType::kDone: return {RoundVerdict::kSucceeded, 0};
    case RoundEventType::kShutdown: return {RoundVerdict::kShutdown, event.exitCode};
    case RoundEventType::kMembership: return reform();
    case RoundEventType::kNodeLost:
      if (budget.elastic) return reform();
      break;
    case RoundEventType::kFailed: break;
  }
  // Exit code 2 is a configuration error (dtrain's own, and argparse's for Python scripts): a restart would
  // fail the same way, so it is reported at once without burning the restarts.
  if (event.type == RoundEventType::kFailed && event.exitCode == static_cast<int>(ExitCode::kConfig))
    return {RoundVerdict::kConfigError, event.exitCode};
  // Exit code 3 is dtrain's usage error (a bad flag, or a malformed DTRAIN_* / worker variable) only when the
  // workers are dtrain: just as deterministic. Another program's 3 means what that program says: restarted, as
  // torchrun restarts every failure.
  if (dtrainWorkers && event.type == RoundEventType::kFailed && event.exitCode == static_cast<int>(ExitCode::kUsage))
    return {RoundVerdict::kConfigError, event.exitCode};
  if (budget.restartCount >= budget.maxRestarts) return {RoundVerdict::kGiveUp, event.exitCode};
  return {RoundVerdict::kRestart, 0};
}

rendezvous::Millis storeCallTimeout(rendezvous::Millis heartbeatTimeout, rendezvous::Millis rdzvTimeout) {
  return std::min(std::max(heartbeatTimeout, rendezvous::Millis(5000)), rdzvTimeout);
}

}  // namespace dtrain::launch
