// The agent behind `dtrain run`: hosts or reaches the rendezvous store, joins rounds, runs this node's workers
// for each round (RoundRunner), and decides after each round whether to restart, stop or exit. It never trains.
//
// Store hosting is a rule, not a guess: with --rdzv-backend static the agent with node rank 0 (or the only
// node) hosts the store at --rdzv-endpoint's port; with --rdzv-backend store nobody hosts and every agent
// connects to a standalone `dtrain store`; --standalone hosts one on a free loopback port.
#pragma once

#include <memory>

#include "lib/launch/launch_options.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous {
class RefusalWatcher;  // logs the nodes the rendezvous refuses (refusal_watcher.h)
}  // namespace dtrain::rendezvous

namespace dtrain::launch {

class StoreHost;  // the embedded TCP store server, when this agent hosts it
class MetricsHub;
class HttpServer;
class Dashboard;
class TimelineCollector;

class Agent {
 public:
  explicit Agent(LaunchOptions options);
  ~Agent();

  // Runs the job to its end and returns the process exit code: 0 on success, the root-cause worker's exit code
  // (128+signal when it was killed) when restarts are exhausted, 128+signal when the agent was interrupted.
  // Throws dtrain::Error for failures of the agent itself (rendezvous, store, bad input).
  int run();

 private:
  void setUpStore();
  void setUpEtcdStore();
  void setUpMetrics();
  void setUpTimeline();

  LaunchOptions options_;
  std::string endpoint_;  // host:port of the store
  std::string runId_;
  bool hosting_ = false;
  std::unique_ptr<StoreHost> host_;
  rendezvous::StorePtr store_;       // prefixed with /dtrain/<run_id>/
  rendezvous::StorePtr watchStore_;  // second connection, for the blocking watch of each round
  std::unique_ptr<MetricsHub> metrics_;        // --metrics-port or --dashboard
  std::unique_ptr<Dashboard> dashboard_;        // --dashboard; reads metrics_
  std::unique_ptr<HttpServer> metricsServer_;   // declared after both: stopped before they go
  std::unique_ptr<HttpServer> dashboardServer_;  // --dashboard on a port of its own
  std::unique_ptr<TimelineCollector> timeline_;  // --timeline here, or `timeline/on` published by another agent
  std::unique_ptr<rendezvous::RefusalWatcher> refusals_;  // the job's first agent: logs refused nodes; last, stopped first
};

}  // namespace dtrain::launch
