// One round of the agent's life: start this node's workers for a formed group, watch them and the group,
// and stop them when the round ends. Event-driven on one Boost.Asio io_context (the agent's main thread):
// SIGCHLD reaps workers, pipes carry their output, a timer drives heartbeats, and a watcher thread blocked
// on the round's `event` key in the store posts the group's decision back to the loop.
//
// No store call runs on the loop's thread: heartbeats, publishing the round's event and marking this node
// finished are queued to a store thread of their own (StoreCalls), whose results are posted back. Each call
// has the deadline of the agent's store client (storeCallTimeout in round_policy.h), so a frozen or mute store
// ends the round with "lost the rendezvous store" within that deadline, and signals and worker exits are
// handled at once meanwhile. The agent's own SIGINT/SIGTERM stops the local workers without waiting for the
// store: the "shutdown" event is published in the background.
//
// A round ends with exactly one RoundEvent (the first published wins, see rendezvous.h). run() returns it
// once every local worker is reaped and its output drained; it never leaves a worker running.
//
// What to do on each input is decided by round_policy.h's decideRound (pure, unit-tested); this class feeds it
// the inputs, carries out its actions (signals, timers, store calls) and moves through its phases.
#pragma once

#include <sys/types.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

#include "lib/launch/launch_options.h"
#include "lib/launch/log_fanout.h"
#include "lib/launch/metrics_hub.h"
#include "lib/launch/process_tree.h"
#include "lib/launch/round_policy.h"
#include "lib/launch/timeline.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::launch {

struct RoundContext {
  const LaunchOptions* options = nullptr;
  rendezvous::Rendezvous* rdzv = nullptr;
  rendezvous::StorePtr watchStore;  // a connection of its own for the blocking watch
  const rendezvous::RoundInfo* round = nullptr;
  std::string storeAddr;
  std::string runId;
  std::string attemptLogDir;  // "" when --log-dir is not given
  ProcessTree* processes = nullptr;  // marks the workers and stops what they leave behind (process_tree.h)
  MetricsHub* metrics = nullptr;     // --metrics-port: the workers' blocks and the agent's counters
  TimelineCollector* timeline = nullptr;  // --timeline (here or on another agent of the run): the workers' files
  // The signals that stop the job (honouredStopSignals(): SIGINT, SIGTERM, and SIGHUP/SIGQUIT unless the agent
  // inherited them ignored); empty means SIGINT and SIGTERM.
  std::vector<int> stopSignals;
};

// The stop signals an agent honours, as torchrun's agent does (SIGINT, SIGTERM, SIGHUP, SIGQUIT), except that
// SIGHUP and SIGQUIT keep an ignore the agent inherited (`nohup dtrain run ...`). Reads the signal dispositions:
// call it once, before installing any handler.
std::vector<int> honouredStopSignals();

// Runs store calls in order on a thread of its own. post() never blocks; the destructor finishes the job in
// progress (bounded by the store client's deadline) and drops the ones not started.
class StoreCalls {
 public:
  StoreCalls();
  ~StoreCalls();
  StoreCalls(const StoreCalls&) = delete;
  StoreCalls& operator=(const StoreCalls&) = delete;
  void post(std::function<void()> job);

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::thread thread_;
};

class RoundRunner {
 public:
  RoundRunner(boost::asio::io_context& io, RoundContext ctx);
  ~RoundRunner();

  rendezvous::RoundEvent run();
  // Set when a stop signal (RoundContext::stopSignals) reached the agent during the round (or SIGUSR1, when a worker stopped after a
  // preemption warning): the agent exits with 128+signal.
  std::optional<int> interruptedBy() const { return state_.interruptedBy; }
  // After run(): a stop signal that reached the agent as the round was ending, too late for the round to act
  // on it (the round had stopped its event loop). The agent treats it as interruptedBy(), so that a crash-looping
  // job still stops on it instead of restarting (it used to be dropped with the round).
  std::optional<int> lateStopSignal() const { return lateStopSignal_; }
  // True when the round ended because this agent lost the rendezvous store (nothing to restart through).
  bool lostStore() const { return lostStore_; }
  // After run(): this node's workers completed their work although a stop signal reached the agent. Every one
  // exited 0, and either all had exited before the signal came (torchrun's rule: a SUCCEEDED group it has seen
  // stays succeeded) or they are dtrain's own trainer, whose exit 0 means its training completed
  // (LaunchOptions::trainerWorkers; a worker of another program that exits 0 on the forwarded signal was stopped).
  bool workersCompletedDespiteSignal() const;
  // After run(): the first stop signal of the round found every local worker already exited.
  bool signalAfterWorkersExited() const { return signalAfterWorkersExited_; }

 private:
  struct Worker {
    int localRank = 0;
    int rank = 0;
    pid_t pid = -1;
    bool exited = false;
    int status = 0;
    // A non-chief worker of an async/ssp parameter-server job (LaunchOptions::psWorkersExpendable): its failure
    // is logged and the round goes on (it counts as finished).
    bool expendable = false;
    std::array<std::unique_ptr<boost::asio::posix::stream_descriptor>, 2> pipes;  // stdout, stderr
    std::array<std::unique_ptr<StreamSink>, 2> sinks;
  };

  void startWorkers();
  void readPipe(Worker& w, int stream);
  void onSignal(const boost::system::error_code& ec, int sig);
  // On io_'s thread. `readAt`: when the stop thread read a stop signal (a repeat close to the first is not a
  // second Ctrl-C, see kRepeatedStopWindow).
  void handleSignal(int sig, std::optional<std::chrono::steady_clock::time_point> readAt = std::nullopt);
  void armStopSignals();       // on stopThread_'s thread
  bool isStopSignal(int sig) const;
  void recordStopSignal(int sig);  // the first stop signal into stopSeen_ (any thread)
  void collectStopSignals();   // at the end of run(): stops stopThread_ and takes what it saw
  void reapChildren();
  void onWorkerExit(Worker& w);
  void onEvent(const rendezvous::RoundEvent& event, bool storeLost = false);
  void onOutputClosed();
  // Carries out `actions` (decided for an input about `subject`, when the input concerns one worker): moves to
  // the next phase first, so that the events this publishes are decided in it.
  void apply(const RoundActions& actions, std::string_view why, const Worker* subject = nullptr);
  // The one place the phase changes.
  void transition(RoundPhase next, std::string_view why);
  LocalWorkers localWorkers() const;
  // Queues `event` to the store thread; the event that wins comes back through onEvent. With `actNow` the round
  // ends with `event` locally at once (the store's answer is then only for the other nodes).
  void publish(const rendezvous::RoundEvent& event, bool actNow = false);
  void publishFailure();
  void stopWorkers(int sig, bool armKillTimer);
  void onHeartbeat();
  void onHeartbeatResult(std::optional<int> silent);
  void finish();
  std::string failureReport(const Worker& w) const;
  void startWatcher();
  rendezvous::RoundEvent storeLost(const std::exception& e) const;

  boost::asio::io_context& io_;
  RoundContext ctx_;
  boost::asio::signal_set signals_;  // SIGCHLD, SIGUSR1, SIGUSR2
  // The stop signals (SIGINT, SIGTERM, and SIGHUP/SIGQUIT when honoured) on their own io_context and thread: the thread records each one (stopSeen_) before posting
  // it to io_, and after the round its io_context, which holds nothing else, can be drained safely. A signal then
  // cannot vanish with a round that ends as it arrives (queued in a set that is destroyed, or posted to a stopped
  // io_context), which happened in crash loops.
  boost::asio::io_context stopIo_;
  boost::asio::signal_set stopSignals_;
  std::thread stopThread_;
  std::atomic<int> stopSeen_{0};
  std::optional<int> lateStopSignal_;
  std::optional<std::chrono::steady_clock::time_point> firstStopReadAt_;  // io_'s thread
  boost::asio::steady_timer heartbeatTimer_;
  boost::asio::steady_timer killTimer_;
  boost::asio::steady_timer drainTimer_;
  boost::asio::steady_timer failTimer_;
  std::vector<Worker> workers_;
  RoundState state_;
  std::optional<rendezvous::RoundEvent> ended_;  // the round's outcome, from kStopping on
  std::optional<int> failedRank_;                // local rank of the first failed worker (the report's subject)
  std::thread watcher_;
  std::atomic<bool> watcherStop_{false};
  bool lostStore_ = false;
  // The first stop signal found every local worker already exited (workersCompletedDespiteSignal).
  bool signalAfterWorkersExited_ = false;
  // Declared last: destroyed (joined) first, while everything its jobs touch is still alive.
  StoreCalls storeCalls_;
};

}  // namespace dtrain::launch
