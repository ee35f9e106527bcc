#include "lib/launch/round_runner.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/post.hpp>

#include <algorithm>
#include <filesystem>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/ps_placement.h"
#include "lib/common/timeline.h"
#include "lib/launch/spawn.h"
#include "lib/launch/worker_env.h"

namespace dtrain::launch {

namespace asio = boost::asio;
using rendezvous::RoundEvent;
using rendezvous::RoundEventType;
using namespace std::chrono_literals;

namespace {
constexpr size_t kTailLines = 20;
constexpr auto kDrainGrace = 2s;  // output still open after every worker exited (a grandchild holds the pipe)
constexpr size_t kReadChunk = 64 * 1024;
}  // namespace

StoreCalls::StoreCalls() : thread_([this] { loop(); }) {}

StoreCalls::~StoreCalls() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    jobs_.clear();
  }
  cv_.notify_one();
  thread_.join();
}

std::vector<int> honouredStopSignals() {
  std::vector<int> sigs{SIGINT, SIGTERM};
  for (int sig : {SIGHUP, SIGQUIT}) {
    struct sigaction now {};
    if (::sigaction(sig, nullptr, &now) == 0 && now.sa_handler != SIG_IGN) sigs.push_back(sig);
  }
  return sigs;
}

void StoreCalls::post(std::function<void()> job) {
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void StoreCalls::loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();  // jobs catch their own errors
  }
}

RoundRunner::RoundRunner(asio::io_context& io, RoundContext ctx)
    : io_(io),
      ctx_(std::move(ctx)),
      // Installed before any worker exists, so no SIGCHLD can be lost.
      signals_(io_, SIGCHLD),
      stopSignals_(stopIo_),
      heartbeatTimer_(io_),
      killTimer_(io_),
      drainTimer_(io_),
      failTimer_(io_) {
  signals_.add(SIGUSR1);
  signals_.add(SIGUSR2);
  if (ctx_.stopSignals.empty()) ctx_.stopSignals = {SIGINT, SIGTERM};
  for (int sig : ctx_.stopSignals) stopSignals_.add(sig);
  state_.multiNode = ctx_.round->numNodes > 1;
}

RoundRunner::~RoundRunner() {
  stopIo_.stop();
  if (stopThread_.joinable()) stopThread_.join();
  watcherStop_ = true;
  if (watcher_.joinable()) watcher_.join();
  // Defensive: run() reaps everything; this only matters if it threw half-way.
  for (auto& w : workers_) {
    if (w.pid > 0 && !w.exited) {
      signalGroup(w.pid, SIGKILL);
      int st;
      ::waitpid(w.pid, &st, 0);
    }
  }
}

RoundEvent RoundRunner::run() {
  signals_.async_wait([this](const boost::system::error_code& ec, int sig) { onSignal(ec, sig); });
  armStopSignals();
  stopThread_ = std::thread([this] { stopIo_.run(); });
  startWatcher();
  startWorkers();
  if (ctx_.round->numNodes > 1) onHeartbeat();
  io_.run();
  // Worker lines queued for a slow console go out before the agent reports the round (bounded: a console
  // nobody reads must not hold the agent).
  ConsoleWriter::forFd(STDOUT_FILENO).flush(kDrainGrace);
  ConsoleWriter::forFd(STDERR_FILENO).flush(kDrainGrace);
  watcherStop_ = true;
  if (watcher_.joinable()) watcher_.join();
  // Whatever is left of each worker's process group (daemonised grandchildren) goes with the round.
  for (auto& w : workers_) signalGroup(w.pid, SIGKILL);
  // ...and so does every other descendant (setsid grandchildren, orphans re-parented to the agent).
  if (ctx_.processes) ctx_.processes->stopLeftovers(ctx_.options->shutdownTimeout);
  collectStopSignals();
  return *ended_;
}

void RoundRunner::startWatcher() {
  int round = ctx_.round->round;
  watcher_ = std::thread([this, round, store = ctx_.watchStore] {
    while (!watcherStop_) {
      try {
        if (auto ev = rendezvous::Rendezvous::waitEvent(*store, round, 500ms)) {
          asio::post(io_, [this, ev = *ev] { onEvent(ev); });
          return;
        }
      } catch (const std::exception& e) {
        if (watcherStop_) return;
        asio::post(io_, [this, lost = storeLost(e)] { onEvent(lost, /*storeLost=*/true); });
        return;
      }
    }
  });
}

RoundEvent RoundRunner::storeLost(const std::exception& e) const {
  return RoundEvent{RoundEventType::kNodeLost,
                    fmt::format("lost the rendezvous store at {}: {}", ctx_.storeAddr, e.what()),
                    static_cast<int>(ExitCode::kRendezvous), ""};
}

void RoundRunner::startWorkers() {
  const auto& round = *ctx_.round;
  const auto& opts = *ctx_.options;
  int nproc = round.self().info.nproc;
  workers_.resize(nproc);
  WorkerContext wctx{&round, 0, ctx_.storeAddr, ctx_.runId, opts.maxRestarts, opts.rdzvToken, opts.psServers,
                     opts.localAddr};
  for (int lr = 0; lr < nproc; ++lr) {
    Worker& w = workers_[lr];
    w.localRank = lr;
    w.rank = round.rankOffset + lr;
    if (opts.psWorkersExpendable) {
      WorkerContext c = wctx;
      c.localRank = lr;
      const WorkerContract contract = workerContract(c);
      w.expendable = contract.roleName == kRoleWorker && contract.roleRank != 0;
    }
    bool shown = opts.localRanksFilter.empty() ||
                 std::find(opts.localRanksFilter.begin(), opts.localRanksFilter.end(), lr) !=
                     opts.localRanksFilter.end();
    int redirect = opts.redirects.forRank(lr);
    std::string dir;
    if (!ctx_.attemptLogDir.empty()) {
      dir = fmt::format("{}/{}", ctx_.attemptLogDir, w.rank);
      std::error_code ec;
      std::filesystem::create_directories(dir, ec);
      DTRAIN_CHECK(!ec, "--log-dir: cannot create {}: {}", dir, ec.message());
    }
    std::string prefix = fmt::format("[n{} r{}] ", round.nodeRank, w.rank);
    int fds[2][2];
    for (int s = 0; s < 2; ++s) {
      DTRAIN_SYSCALL(::pipe2(fds[s], O_CLOEXEC));
      int consoleFd = (shown && !(redirect & (1 << s))) ? (s == 0 ? STDOUT_FILENO : STDERR_FILENO) : -1;
      std::string file = dir.empty() ? "" : fmt::format("{}/{}.log", dir, s == 0 ? "stdout" : "stderr");
      w.sinks[s] = std::make_unique<StreamSink>(prefix, consoleFd, file, s == 1 ? kTailLines : 0);
    }
    wctx.localRank = lr;
    SpawnSpec spec{opts.programPath, opts.program, workerEnvironment(wctx), fds[0][1], fds[1][1]};
    if (ctx_.metrics) spec.env.push_back(fmt::format("{}={}", kMetricsShmEnv, ctx_.metrics->prepareSlot(lr)));
    if (ctx_.timeline)
      spec.env.push_back(fmt::format("{}={}", timeline::kTimelineEnv, ctx_.timeline->workerFile(round.round, w.rank)));
    if (ctx_.processes) ctx_.processes->mark(spec.env);
    try {
      w.pid = spawnProcess(spec);
    } catch (...) {
      for (auto& f : fds) ::close(f[0]), ::close(f[1]);
      throw;
    }
    for (int s = 0; s < 2; ++s) {
      ::close(fds[s][1]);
      ::fcntl(fds[s][0], F_SETFL, ::fcntl(fds[s][0], F_GETFL) | O_NONBLOCK);
      w.pipes[s] = std::make_unique<asio::posix::stream_descriptor>(io_, fds[s][0]);
      readPipe(w, s);
    }
    if (ctx_.metrics) ctx_.metrics->workerStarted();
    log::debug("started rank {} (local rank {}) as pid {}", w.rank, lr, w.pid);
  }
}

void RoundRunner::readPipe(Worker& w, int s) {
  auto buf = std::make_shared<std::vector<char>>(kReadChunk);
  w.pipes[s]->async_read_some(asio::buffer(*buf), [this, &w, s, buf](const boost::system::error_code& ec, size_t n) {
    if (n > 0) w.sinks[s]->feed(buf->data(), n);
    if (!ec) {
      readPipe(w, s);
      return;
    }
    if (ec == asio::error::operation_aborted && !w.pipes[s]) return;
    w.sinks[s]->finish();
    w.pipes[s].reset();
    if (s == 1 && failedRank_ == w.localRank)
      apply(decideRound(state_, RoundInput::failureReport(localWorkers())), "the failed worker's stderr closed");
    onOutputClosed();
  });
}

bool RoundRunner::workersCompletedDespiteSignal() const {
  return localWorkers().allSucceeded && (signalAfterWorkersExited_ || ctx_.options->trainerWorkers);
}

LocalWorkers RoundRunner::localWorkers() const {
  LocalWorkers lw;
  lw.allExited = std::all_of(workers_.begin(), workers_.end(), [](const Worker& w) { return w.exited; });
  lw.allSucceeded = std::all_of(workers_.begin(), workers_.end(), [](const Worker& w) {
    return w.exited && WIFEXITED(w.status) && WEXITSTATUS(w.status) == 0;
  });
  lw.drained =
      std::all_of(workers_.begin(), workers_.end(), [](const Worker& w) { return !w.pipes[0] && !w.pipes[1]; });
  return lw;
}

void RoundRunner::transition(RoundPhase next, std::string_view why) {
  if (next == state_.phase) return;
  log::debug("round {}: {} -> {} ({})", ctx_.round->round, roundPhaseName(state_.phase), roundPhaseName(next), why);
  state_.phase = next;
}

void RoundRunner::apply(const RoundActions& a, std::string_view why, const Worker* subject) {
  bool enteringDone = a.next.phase == RoundPhase::kDone && state_.phase != RoundPhase::kDone;
  if (subject && a.next.phase == RoundPhase::kFailurePending &&
      (state_.phase != RoundPhase::kFailurePending || a.newRootCause))
    failedRank_ = subject->localRank;
  transition(a.next.phase, why);
  state_.interruptedBy = a.next.interruptedBy;
  state_.preemptedBy = a.next.preemptedBy;
  state_.rootCauseGrace = a.next.rootCauseGrace;
  if (a.forwardSignal != 0)
    for (auto& w : workers_)
      if (!w.exited) signalGroup(w.pid, a.forwardSignal);
  if (a.stopSignal) stopWorkers(*a.stopSignal, a.armKillTimer);
  if (a.waitForReport) {
    // The report quotes the worker's last stderr lines: it is published once its stderr is drained, or shortly
    // after if a grandchild keeps the pipe open.
    failTimer_.expires_after(std::chrono::milliseconds(300));
    failTimer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) apply(decideRound(state_, RoundInput::failureReport(localWorkers())), "no more stderr to wait for");
    });
  }
  if (a.armRootCauseTimer) {
    // Long enough for the heartbeats to find a dead node (round_policy.h, rootCauseGrace).
    auto grace = ctx_.options->heartbeatTimeout + 2 * ctx_.options->heartbeatInterval;
    log::debug("rank {} lost a peer in a collective: waiting up to {} ms for the root cause", subject ? subject->rank : -1,
               grace.count());
    failTimer_.expires_after(grace);
    failTimer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec)
        apply(decideRound(state_, RoundInput::failureReport(localWorkers(), /*graceOver=*/true)),
              "no root cause elsewhere");
    });
  }
  if (a.armDrainTimer) {
    drainTimer_.expires_after(kDrainGrace);
    drainTimer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      for (auto& w : workers_)
        for (int s = 0; s < 2; ++s)
          if (w.pipes[s]) {
            w.sinks[s]->finish();
            w.pipes[s].reset();
          }
      onOutputClosed();
    });
  }
  if (a.markFinished) {
    storeCalls_.post([this] {
      try {
        ctx_.rdzv->markFinished(*ctx_.round);
      } catch (const std::exception& e) {
        asio::post(io_, [this, lost = storeLost(e)] { onEvent(lost, /*storeLost=*/true); });
      }
    });
  }
  const auto& me = ctx_.round->self().info;
  switch (a.publish) {
    case Publish::kNone: break;
    case Publish::kShutdown: {
      int sig = *state_.interruptedBy;
      publish(RoundEvent{RoundEventType::kShutdown,
                         fmt::format("the agent on node {} ({}) received SIG{}", ctx_.round->nodeRank, me.hostname,
                                     sigabbrev_np(sig)),
                         128 + sig, ""},
              // With workers to stop, at once; once every local worker has exited there is nothing to stop, and
              // the group's answer decides (a "done" already in the store means the job completed: exit 0).
              /*actNow=*/!localWorkers().allExited);
      break;
    }
    case Publish::kPreemptedShutdown: {
      int sig = *state_.preemptedBy;
      publish(RoundEvent{RoundEventType::kShutdown,
                         fmt::format("rank {} stopped after SIG{} (preemption): {}", subject->rank, sigabbrev_np(sig),
                                     describeStatus(subject->status)),
                         128 + sig, ""});
      break;
    }
    case Publish::kFailure: publishFailure(); break;
  }
  if (enteringDone) finish();
}

void RoundRunner::armStopSignals() {
  stopSignals_.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    recordStopSignal(sig);
    asio::post(io_, [this, sig, at = std::chrono::steady_clock::now()] { handleSignal(sig, at); });
    armStopSignals();
  });
}

void RoundRunner::recordStopSignal(int sig) {
  int none = 0;
  stopSeen_.compare_exchange_strong(none, sig);
}

void RoundRunner::collectStopSignals() {
  stopIo_.stop();
  if (stopThread_.joinable()) stopThread_.join();
  // One that came with no wait pending is queued in the set: a fresh wait takes it at once. stopIo_ holds only
  // these waits, so running it here runs nothing else.
  stopIo_.restart();
  stopSignals_.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (!ec) recordStopSignal(sig);
  });
  stopIo_.poll();
  stopSignals_.cancel();
  stopIo_.poll();
  // From here to the agent's own handler (agent.cpp), the stop signals take their default action: they end the
  // agent, whose workers are gone by now, rather than wait unseen in a set about to be destroyed.
  boost::system::error_code ignored;
  stopSignals_.clear(ignored);
  if (const int sig = stopSeen_.load(); sig != 0 && !state_.interruptedBy) lateStopSignal_ = sig;
}

void RoundRunner::onSignal(const boost::system::error_code& ec, int sig) {
  if (ec) return;
  signals_.async_wait([this](const boost::system::error_code& e, int s) { onSignal(e, s); });
  handleSignal(sig);
}

bool RoundRunner::isStopSignal(int sig) const {
  return std::find(ctx_.stopSignals.begin(), ctx_.stopSignals.end(), sig) != ctx_.stopSignals.end();
}

void RoundRunner::handleSignal(int sig, std::optional<std::chrono::steady_clock::time_point> readAt) {
  if (sig == SIGCHLD) {
    reapChildren();
    return;
  }
  if (isStopSignal(sig) && !state_.interruptedBy) signalAfterWorkersExited_ = localWorkers().allExited;
  std::optional<std::chrono::milliseconds> sinceFirstStop;
  if (readAt && firstStopReadAt_)
    sinceFirstStop = std::chrono::duration_cast<std::chrono::milliseconds>(*readAt - *firstStopReadAt_);
  else if (readAt)
    firstStopReadAt_ = readAt;
  auto a = decideRound(state_, RoundInput::signalled(sig, localWorkers(), sinceFirstStop));
  if (sinceFirstStop && !a.stopSignal && a.publish == Publish::kNone && state_.interruptedBy)
    log::info("received SIG{} again {} ms after the first: the same stop request (a second one after {} ms "
              "kills the workers at once)",
              sigabbrev_np(sig), sinceFirstStop->count(), kRepeatedStopWindow.count());
  if (a.forwardSignal) log::warn("received SIG{}: forwarding it to the workers", sigabbrev_np(sig));
  if (a.publish == Publish::kShutdown)
    log::warn("received SIG{}: {}", sigabbrev_np(sig),
              localWorkers().allExited ? "every local worker has already exited" : "stopping the workers");
  apply(a, fmt::format("SIG{}", sigabbrev_np(sig)));
}

void RoundRunner::reapChildren() {
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) break;
    for (auto& w : workers_) {
      if (w.pid == pid && !w.exited) {
        w.exited = true;
        w.status = status;
        onWorkerExit(w);
      }
    }
  }
}

void RoundRunner::onWorkerExit(Worker& w) {
  log::debug("rank {} (pid {}) ended: {}", w.rank, w.pid, describeStatus(w.status));
  if (ctx_.metrics) ctx_.metrics->workerExited(exitCodeOf(w.status), w.localRank);
  const bool failed = !WIFEXITED(w.status) || WEXITSTATUS(w.status) != 0;
  if (w.expendable && failed && state_.phase == RoundPhase::kRunning) {
    // Async parameter server: the servers drop this worker and the others go on; to the round it finished.
    log::warn("rank {} (a parameter-server worker) ended: {}; async training goes on with the other workers "
              "(the rest of its data shard is not trained on)",
              w.rank, describeStatus(w.status));
    w.status = 0;
  }
  auto a = decideRound(state_, RoundInput::workerExited(w.status, w.pipes[1] != nullptr, localWorkers()));
  apply(a, fmt::format("rank {} ended: {}", w.rank, describeStatus(w.status)), &w);
}

void RoundRunner::onOutputClosed() {
  apply(decideRound(state_, RoundInput::outputClosed(localWorkers())), "worker output closed");
}

std::string RoundRunner::failureReport(const Worker& w) const {
  const auto& me = ctx_.round->self().info;
  std::string report = fmt::format("worker failed: node {} ({}), rank {} (local rank {}), pid {}: {}",
                                   ctx_.round->nodeRank, me.hostname, w.rank, w.localRank, w.pid,
                                   describeStatus(w.status));
  // A worker cannot catch SIGKILL, so it says nothing about it: name who usually sends it unasked. (The agent's own
  // SIGKILL comes after --shutdown-timeout, when a round is already ending, not as a round's first failure.)
  if (WIFSIGNALED(w.status) && WTERMSIG(w.status) == SIGKILL)
    report += fmt::format("\n(SIGKILL from outside dtrain: the kernel's out-of-memory killer sends it when memory "
                          "runs out, see `dmesg`; or a kill -9)");
  const auto& tail = w.sinks[1]->tail();
  if (!tail.empty()) {
    report += fmt::format("\nlast {} line(s) of rank {}'s stderr:", tail.size(), w.rank);
    for (const auto& line : tail) report += "\n  | " + line;
  } else {
    report += fmt::format("\n(rank {} wrote nothing to stderr)", w.rank);
  }
  return report;
}

void RoundRunner::publishFailure() {
  failTimer_.cancel();
  const Worker& w = workers_.at(static_cast<size_t>(*failedRank_));
  std::string report = failureReport(w);
  publish(RoundEvent{RoundEventType::kFailed, report.substr(0, report.find('\n')), exitCodeOf(w.status), report});
}

void RoundRunner::publish(const RoundEvent& event, bool actNow) {
  // The agent's own shutdown does not wait for the store: the exit code is 128+signal whoever wins the round.
  if (actNow) onEvent(event);
  storeCalls_.post([this, event] {
    try {
      RoundEvent winner = ctx_.rdzv->endRound(ctx_.round->round, event);
      asio::post(io_, [this, winner] { onEvent(winner); });
    } catch (const std::exception& e) {
      log::warn("could not publish '{}' to the rendezvous store: {}", rendezvous::roundEventName(event.type),
                e.what());
      // The store is gone: the round ends here with what this node knows (a failure keeps its report).
      RoundEvent lost = storeLost(e);
      if (event.type == RoundEventType::kFailed) lost.report = event.report;
      asio::post(io_, [this, lost] { onEvent(lost, /*storeLost=*/true); });
    }
  });
}

void RoundRunner::onEvent(const RoundEvent& event, bool storeLost) {
  auto a = decideRound(state_, RoundInput::roundEvent(event.type, event.exitCode, localWorkers()));
  if (a.endsRound) {
    ended_ = event;
    lostStore_ = storeLost;
    heartbeatTimer_.cancel();
  }
  apply(a, fmt::format("round event '{}'", rendezvous::roundEventName(event.type)));
}

void RoundRunner::stopWorkers(int sig, bool armKillTimer) {
  if (sig != 0)
    for (auto& w : workers_)
      if (!w.exited) signalGroup(w.pid, sig);
  if (armKillTimer) {
    killTimer_.expires_after(ctx_.options->shutdownTimeout);
    killTimer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      for (auto& w : workers_) {
        if (!w.exited) {
          log::warn("rank {} (pid {}) did not stop within --shutdown-timeout; sending SIGKILL", w.rank, w.pid);
          signalGroup(w.pid, SIGKILL);
        }
      }
    });
  }
}

void RoundRunner::onHeartbeat() {
  if (roundEnded(state_.phase)) return;
  storeCalls_.post([this] {
    try {
      auto silent = ctx_.rdzv->beat(*ctx_.round, ctx_.options->heartbeatTimeout);  // one round trip
      if (ctx_.metrics) ctx_.metrics->setHeartbeatAges(ctx_.rdzv->heartbeatAges(*ctx_.round));
      std::optional<int> first;
      if (!silent.empty()) first = silent.front();
      asio::post(io_, [this, first] { onHeartbeatResult(first); });
    } catch (const std::exception& e) {
      asio::post(io_, [this, lost = storeLost(e)] { onEvent(lost, /*storeLost=*/true); });
    }
  });
}

void RoundRunner::onHeartbeatResult(std::optional<int> silent) {
  if (roundEnded(state_.phase)) return;
  if (silent) {
    // A watched member: its record is always among the ones this agent knows (rendezvous.h).
    const auto* lostMember = ctx_.round->member(*silent);
    rendezvous::NodeInfo lost = lostMember ? lostMember->info : rendezvous::NodeInfo{};
    publish(RoundEvent{RoundEventType::kNodeLost,
                       fmt::format("node {} ({}, agent pid {}) sent no heartbeat for {} ms", *silent, lost.hostname,
                                   lost.pid, ctx_.options->heartbeatTimeout.count()),
                       static_cast<int>(ExitCode::kRendezvous), ""});
    return;
  }
  heartbeatTimer_.expires_after(ctx_.options->heartbeatInterval);
  heartbeatTimer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) onHeartbeat();
  });
}

void RoundRunner::finish() {
  killTimer_.cancel();
  drainTimer_.cancel();
  failTimer_.cancel();
  signals_.cancel();
  io_.stop();
}

}  // namespace dtrain::launch
