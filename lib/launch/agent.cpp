#include "lib/launch/agent.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <fmt/ranges.h>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "lib/launch/dashboard.h"
#include "lib/launch/flight_report.h"
#include "lib/launch/http_server.h"
#include "lib/launch/metrics_hub.h"
#include "lib/launch/monitor_endpoints.h"
#include "lib/launch/process_tree.h"
#include "lib/launch/round_policy.h"
#include "lib/launch/round_runner.h"
#include "lib/launch/timeline.h"
#include "lib/launch/worker_env.h"
#include "rendezvous/etcd_store.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/refusal_watcher.h"
#include "rendezvous/rendezvous.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::launch {

using rendezvous::RoundEvent;
using rendezvous::RoundEventType;
using rendezvous::RoundInfo;
using namespace std::chrono_literals;

class StoreHost {
 public:
  ~StoreHost() {
    if (!tokenFile.empty()) ::unlink(tokenFile.c_str());
  }
  std::unique_ptr<rendezvous::TcpStoreServer> server;
  std::string tokenFile;  // --standalone's random token, readable by this user only; removed with the store
};

namespace {

// After a terminal outcome the store's host lingers this long for the other agents to read it.
constexpr auto kLingerForPeers = 5s;

std::string randomRunId() {
  std::random_device rd;
  return fmt::format("{:08x}{:08x}", rd(), rd());
}

// --standalone draws its store's port and token at random, and `dtrain top` / `debug dump` need both: the token
// goes into a file only this user can read ($XDG_RUNTIME_DIR, else /tmp; never printed), and the log says how to
// reach the job. Returns the file's path, or "" (with a warning) when it cannot be written. The file is created,
// never reused: another standalone run given the same --rdzv-id (or one killed with SIGKILL) may own
// dtrain-RUN_ID.token, and rewriting it broke that run's dtrain top while this run's exit removed its file; then
// the name also carries this store's port, which no live store shares.
std::string writeTokenFileIn(const std::string& dir, const std::string& runId, int port, const std::string& token,
                             std::string& error) {
  std::string path = fmt::format("{}/dtrain-{}.token", dir, runId);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    path = fmt::format("{}/dtrain-{}-{}.token", dir, runId, port);
    // (Left only by a run on this port killed with SIGKILL: rewritten.)
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  }
  bool ok = fd >= 0 && ::fchmod(fd, 0600) == 0 &&
            ::write(fd, token.data(), token.size()) == static_cast<ssize_t>(token.size());
  if (!ok) error = fmt::format("{}: {}", path, std::strerror(errno));
  if (fd >= 0) {
    ::close(fd);
    if (!ok) ::unlink(path.c_str());
  }
  return ok ? path : "";
}

// $XDG_RUNTIME_DIR when it is a folder, else (or when nothing can be created there) /tmp.
std::string writeTokenFile(const std::string& runId, int port, const std::string& token) {
  std::vector<std::string> dirs;
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  struct stat st {};
  if (runtime != nullptr && *runtime != '\0' && ::stat(runtime, &st) == 0 && S_ISDIR(st.st_mode))
    dirs.emplace_back(runtime);
  dirs.emplace_back("/tmp");
  std::vector<std::string> errors;
  for (const auto& dir : dirs) {
    std::string error;
    if (std::string path = writeTokenFileIn(dir, runId, port, token, error); !path.empty()) return path;
    errors.push_back(std::move(error));
  }
  log::warn("cannot write the standalone store's token ({}): dtrain top cannot reach this job",
            fmt::join(errors, "; "));
  return "";
}

// A stop signal outside a round (while the store is set up, during the rendezvous, between rounds) keeps its
// default action, ending the agent, except that it first removes the standalone token file, which the
// destructors would have. Inside a round the round runner handles the signals (round_runner.h). Set before the
// handler is installed, read only by it.
char gTokenFileToRemove[4096] = "";
// While the agent waits as a spare (rendezvous::RendezvousOptions::armStop), a stop signal is only recorded:
// join() sees it within a second, takes this node out of the round's counts, and the agent then ends as the
// signal would have ended it (a spare that just died stayed counted: the next node to join re-formed the
// running round for nothing, and the store's host waited 5 s for it at the job's end).
volatile sig_atomic_t gDeferStop = 0;
volatile sig_atomic_t gDeferredStop = 0;
// From the end of a round until the agent knows what comes next, and from then to its exit once the job's
// outcome is decided (every worker finished, or the job failed for good), a stop signal is only recorded here:
// ending the agent there turned a job that had completed into 128+signal while the store's host waited for the
// other agents to read the outcome, or while --timeline was written. Before the decision the agent folds it into
// the round's outcome (as RoundRunner::lateStopSignal); after it the decided exit code stands.
volatile sig_atomic_t gRecordStopOnly = 0;
volatile sig_atomic_t gRecordedStop = 0;

// The agent hosting the store outlives the other agents' last reads at the job's end (each bounded by
// kLingerForPeers): the `members` agents of `round` (0: do not wait for them) acknowledging it
// (Rendezvous::acknowledgeEnd), and the agents waiting for a round after it (spares; waitSparesAcknowledged), who
// learn the outcome from the store within a second.
void lingerForPeers(rendezvous::Rendezvous& rdzv, int round, int members) {
  try {
    if (members > 1) {
      RoundInfo ended;
      ended.round = round;
      ended.numNodes = members;
      rdzv.waitAcknowledged(ended, kLingerForPeers);
    }
    rdzv.waitSparesAcknowledged(round, kLingerForPeers);
  } catch (const std::exception& e) {
    log::debug("could not wait for the other agents to see the end of round {}: {}", round, e.what());
  }
}

extern "C" void stopOutsideRound(int sig) {
  if (gRecordStopOnly) {
    if (!gRecordedStop) gRecordedStop = sig;
    return;
  }
  if (gDeferStop && !gDeferredStop) {  // a second signal (say, a store that stopped answering) ends it at once
    gDeferredStop = sig;
    return;
  }
  if (gTokenFileToRemove[0] != '\0') ::unlink(gTokenFileToRemove);  // async-signal-safe
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// Every honoured stop signal (honouredStopSignals: SIGINT and SIGTERM always, since an ignored SIGINT inherited
// from a script's `dtrain run ... &` would otherwise be honoured during rounds only, by the round's handler, and
// ignored during the rendezvous; SIGHUP and SIGQUIT unless inherited ignored, as under nohup).
void handleStopSignalsOutsideRounds(const std::vector<int>& stopSignals) {
  for (int sig : stopSignals) ::signal(sig, stopOutsideRound);
}

// A stop signal recorded after the job's outcome was decided (gRecordStopOnly): say that it changed nothing.
void reportStopAfterOutcome(int exitCode) {
  if (const int sig = gRecordedStop)
    log::info("SIG{} came after the job's outcome was decided ({}): exit {} as decided",
              sigabbrev_np(sig), exitCode == 0 ? "it completed" : "it had ended", exitCode);
}

void printBlock(log::Level level, const std::string& text) {
  size_t start = 0;
  while (start <= text.size()) {
    size_t nl = text.find('\n', start);
    log::write(level, std::string_view(text).substr(start, nl == std::string::npos ? std::string::npos : nl - start));
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
}

// What the user reads about the end of a round (decided by decideAfterRound).
void reportAfterRound(const AfterRound& after, const RoundEvent& event, const RestartBudget& budget) {
  const std::string& details = event.report.empty() ? event.message : event.report;
  int restartCount = budget.restartCount, maxRestarts = budget.maxRestarts;
  switch (after.verdict) {
    case RoundVerdict::kInterrupted:
    case RoundVerdict::kSucceeded: break;
    case RoundVerdict::kShutdown: log::error("stopping: {}", event.message); break;
    case RoundVerdict::kConfigError:
      printBlock(log::Level::kError, event.report);
      if (after.exitCode == static_cast<int>(ExitCode::kUsage))
        log::error("exit code 3 is dtrain's usage error (a bad flag, or a malformed environment variable): not "
                   "restarting (a restart would fail the same way, whatever --max-restarts says: fix the worker's "
                   "command line or environment)");
      else
        log::error("exit code 2 is a configuration error: not restarting (a restart would fail the same way, whatever "
                   "--max-restarts says: fix the job or its command line)");
      break;
    case RoundVerdict::kGiveUp:
      printBlock(log::Level::kError, details);
      if (maxRestarts > 0) log::error("giving up after {} restart(s) (--max-restarts {})", restartCount, maxRestarts);
      else log::error("not restarting: --max-restarts is 0 (give --max-restarts N to restart the workers after a failure)");
      if (event.type == RoundEventType::kNodeLost)
        log::error("a lost node is a failure in a fixed-size job (--nnodes N); with --nnodes MIN:MAX the survivors "
                   "would re-form without it");
      break;
    case RoundVerdict::kRestart:
      printBlock(log::Level::kWarn, details);
      log::warn("restarting the workers (restart {} of {})", restartCount + 1, maxRestarts);
      break;
    case RoundVerdict::kReform:
      log::info("re-forming the group: {} (a membership change, not a failure: re-formation {} of {}, "
                "--max-reforms)",
                event.message, budget.reformCount + 1, budget.maxReforms);
      break;
    case RoundVerdict::kTooManyReforms:
      log::error("{}", event.message);
      log::error("not re-forming: the group already re-formed {} time(s) (--max-reforms {}): nodes keep leaving or "
                 "joining; raise --max-reforms if that is expected",
                 budget.reformCount, budget.maxReforms);
      break;
    case RoundVerdict::kStoreLost:
      if (!event.report.empty()) printBlock(log::Level::kError, event.report);
      log::error("{}", event.message);
      log::error("not restarting: the rendezvous store is gone, so the group can neither restart nor re-form "
                 "(--max-restarts cannot help; keep the store's host alive, or run a standalone `dtrain store` "
                 "with --rdzv-backend store)");
      break;
  }
}

}  // namespace

Agent::Agent(LaunchOptions options) : options_(std::move(options)) {}
Agent::~Agent() = default;

void Agent::setUpStore() {
  if (options_.rdzvBackend == "etcd") {
    setUpEtcdStore();
    return;
  }
  net::HostPort hp;
  bool randomToken = false;
  if (options_.standalone) {
    hp = {"127.0.0.1", 0};
    runId_ = options_.rdzvId == "none" ? randomRunId() : options_.rdzvId;
    // The loopback store is reachable by every local user: it gets a secret that only the workers learn.
    randomToken = options_.rdzvToken.empty();
    if (randomToken) options_.rdzvToken = randomRunId() + randomRunId();
    hosting_ = true;
  } else {
    hp = *net::parseHostPort(options_.rdzvEndpoint.empty() ? "127.0.0.1" : options_.rdzvEndpoint, rendezvous::kDefaultPort);
    runId_ = options_.rdzvId;
    hosting_ = options_.rdzvBackend == "static" && (options_.nodeRank == 0 || options_.maxNodes == 1);
  }
  if (hosting_) {
    host_ = std::make_unique<StoreHost>();
    rendezvous::TcpStoreServerOptions so;
    so.host = options_.storeBindHost();
    so.port = hp.port;
    so.token = options_.rdzvToken;
    try {
      host_->server = rendezvous::TcpStoreServer::start(so);
    } catch (const Error& e) {
      // No endpoint given: the user never chose port 29400, and a second `dtrain run job.json` on the machine finds it
      // taken by the first. Say where it came from and what avoids it.
      if (options_.rdzvEndpoint.empty() && !options_.standalone)
        throw Error(fmt::format("cannot host the rendezvous store on the default port {} (no --rdzv-endpoint was "
                                "given): {}; another job on this machine may hold it: --standalone takes a free port, "
                                "or give --rdzv-endpoint 127.0.0.1:PORT",
                                hp.port, e.what()),
                    ExitCode::kAddressInUse);
      throw Error(fmt::format("cannot host the rendezvous store on port {} (--rdzv-endpoint {}; it listens on "
                              "{}, set another address with --rdzv-bind): {}",
                              hp.port, hp.str(), so.host, e.what()),
                  ExitCode::kAddressInUse);
    }
    hp.port = host_->server->port();
    // dtrain top and debug dump find the agents through the endpoint --metrics-port (or --dashboard) publishes:
    // without one there is no command to give, and the token file would be a secret on disk for nothing.
    const bool monitored = options_.metricsPort >= 0 || options_.dashboardPort >= 0;
    if (options_.standalone && !monitored) {
      log::info("standalone store on {}, run id {}; start the run with --metrics-port 0 to watch it with dtrain top",
                hp.str(), runId_);
    } else if (options_.standalone) {
      const std::string how =
          randomToken ? ((host_->tokenFile = writeTokenFile(runId_, hp.port, options_.rdzvToken)).empty()
                             ? std::string(" (with the token, which could not be written)")
                             : " --rdzv-token-file " + host_->tokenFile)
                      : !options_.rdzvTokenFile.empty() ? " --rdzv-token-file " + options_.rdzvTokenFile
                                                        : std::string(" --rdzv-token ...");
      if (host_->tokenFile.size() < sizeof(gTokenFileToRemove))
        std::memcpy(gTokenFileToRemove, host_->tokenFile.c_str(), host_->tokenFile.size() + 1);
      log::info("standalone store on {}, run id {}; watch the job with: dtrain top {} --rdzv-endpoint {}{}", hp.str(),
                runId_, runId_, hp.str(), how);
    }
  }
  endpoint_ = hp.str();
  // torchrun's c10d has the agent at the endpoint host a store; dtrain's c10d is its `store` backend, which nobody
  // hosts. Said before the wait (up to --rdzv-timeout, 900 s by default), not only when it ends.
  const std::string c10d =
      "--rdzv-backend c10d is dtrain's alias of store: every agent connects to a standalone `dtrain store` running at "
      "the endpoint and none hosts it (unlike torchrun's c10d); to have an agent host it, use --rdzv-backend static "
      "with --node-rank 0 on that node";
  if (options_.rdzvBackendC10d)
    log::info("run {}: connecting to the rendezvous store at {} (up to --rdzv-timeout {} s); {}", runId_, endpoint_,
              options_.rdzvTimeout.count() / 1000, c10d);
  rendezvous::StorePtr client;
  try {
    rendezvous::TcpStoreClientOptions co;
    co.host = hp.host;
    co.port = hp.port;
    co.connectTimeout = options_.rdzvTimeout;
    co.token = options_.rdzvToken;
    client = rendezvous::TcpStoreClient::connect(co);
  } catch (const rendezvous::StoreAuthError&) {
    throw;  // names --rdzv-token: nothing to add
  } catch (const ProtocolError&) {
    throw;  // something answers there, but not a dtrain store of this version: exit 6 as documented
  } catch (const Error& e) {
    std::string who = options_.rdzvBackend == "static"
                          ? "with --rdzv-backend static the agent with --node-rank 0 hosts it: is it running, and "
                            "is --rdzv-endpoint its address?"
                      : options_.rdzvBackendC10d ? c10d
                                                 : "with --rdzv-backend store a standalone `dtrain store` must be running there";
    throw RendezvousError(fmt::format("no rendezvous store answered at {} within {} s ({}): {}", endpoint_,
                                      options_.rdzvTimeout.count() / 1000, who, e.what()));
  }
  // Every single call gets a deadline from the heartbeat settings instead of the store's 300 s default: a
  // frozen or mute store then ends the job in bounded time (clones, like the round watcher's, inherit it).
  client->setTimeout(storeCallTimeout(options_.heartbeatTimeout, options_.rdzvTimeout));
  store_ = std::make_shared<rendezvous::PrefixStore>(rendezvous::runPrefix(runId_), client);
  watchStore_ = store_->clone();
}

// --rdzv-backend etcd: every agent (and, through DTRAIN_STORE=etcd://..., every worker) is a client of the etcd
// cluster; nobody hosts a store, so any node may fail without taking the rendezvous with it.
void Agent::setUpEtcdStore() {
  runId_ = options_.rdzvId;
  hosting_ = false;
  rendezvous::EtcdStoreOptions eo = options_.etcdOptions();
  eo.connectTimeout = options_.rdzvTimeout;
  // A lease outlives a few missed heartbeats, like --heartbeat-timeout (at least 2 s: etcd's minimum is 1).
  eo.leaseTtlSeconds = std::max<int64_t>(2, std::chrono::ceil<std::chrono::seconds>(options_.heartbeatTimeout).count());
  std::shared_ptr<rendezvous::EtcdStore> client;
  try {
    client = rendezvous::EtcdStore::connect(eo);
  } catch (const rendezvous::EtcdRefusedError&) {
    throw;  // TLS or credentials: it names what to fix
  } catch (const Error& e) {
    throw RendezvousError(fmt::format("no etcd endpoint of {} answered within {} s (--rdzv-backend etcd needs a "
                                      "running etcd v3 cluster at --rdzv-endpoint): {}",
                                      options_.rdzvEndpoint, options_.rdzvTimeout.count() / 1000, e.what()));
  }
  endpoint_ = client->address();
  // Workers reach etcd through DTRAIN_STORE=etcd://... and the TLS files and credentials below (connectStore
  // reads them; workers inherit the agent's environment).
  auto exportEnv = [](const char* name, const std::string& value) {
    if (!value.empty()) ::setenv(name, value.c_str(), 1);
  };
  exportEnv(rendezvous::kEtcdCaCertEnv, eo.caCert);
  exportEnv(rendezvous::kEtcdCertEnv, eo.cert);
  exportEnv(rendezvous::kEtcdKeyEnv, eo.key);
  exportEnv(rendezvous::kEtcdUserEnv, eo.user);
  exportEnv(rendezvous::kEtcdPasswordEnv, eo.password);
  client->setTimeout(storeCallTimeout(options_.heartbeatTimeout, options_.rdzvTimeout));
  store_ = std::make_shared<rendezvous::PrefixStore>(rendezvous::runPrefix(runId_), client);
  watchStore_ = store_->clone();
}

void Agent::setUpMetrics() {
  if (options_.metricsPort < 0 && options_.dashboardPort < 0) return;
  metrics_ = std::make_unique<MetricsHub>(options_.jobName, runId_);
  if (options_.dashboardPort >= 0) dashboard_ = std::make_unique<Dashboard>(*metrics_, options_.jobName, runId_);
  // One handler for both ports: --dashboard's port serves /metrics too, --metrics-port's the dashboard when on.
  HttpHandler handler = [hub = metrics_.get(), dashboard = dashboard_.get()](std::string_view target) {
    if (dashboard)
      if (auto r = dashboard->handle(target)) return *r;
    if (target == "/metrics" || target.substr(0, 9) == "/metrics?")
      return HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8", hub->render()};
    if (target == "/debug/flight")
      return HttpResponse{200, "text/plain; charset=utf-8", analyzeFlight(hub->flightRecords(), unixNowNs())};
    if (target == "/debug/flight.json") {
      nlohmann::json ranks = nlohmann::json::array();
      for (const auto& r : hub->flightRecords()) ranks.push_back(toJson(r));
      return HttpResponse{200, "application/json", ranks.dump()};
    }
    return HttpResponse{404, "text/plain; charset=utf-8",
                        dashboard ? "not found: this endpoint serves /dashboard, /metrics, /debug/flight and /debug/flight.json\n"
                                  : "not found: this endpoint serves /metrics, /debug/flight and /debug/flight.json\n"};
  };
  if (options_.metricsPort >= 0) {
    metricsServer_ = std::make_unique<HttpServer>(options_.metricsBind, options_.metricsPort, handler, "--metrics-port");
    log::info("serving Prometheus metrics on http://{}/metrics", net::joinHostPort(options_.metricsBind, metricsServer_->port()));
  }
  if (dashboard_) {
    int port = metricsServer_ ? metricsServer_->port() : -1;
    if (options_.dashboardPort != port) {
      dashboardServer_ = std::make_unique<HttpServer>(options_.metricsBind, options_.dashboardPort, handler, "--dashboard");
      port = dashboardServer_->port();
    }
    log::info("serving the dashboard on http://{}/dashboard", net::joinHostPort(options_.metricsBind, port));
  }
}

void Agent::setUpTimeline() {
  if (options_.timelineFile.empty()) return;
  timeline_ = std::make_unique<TimelineCollector>(options_.timelineFile, store_);
  // Before joining: every other agent of the run checks this key after each rendezvous, before its workers start.
  store_->set(kTimelineOnKey, "1");
}

int Agent::run() {
  // Slurm's --signal=USR1 warning must not kill the agent between rounds (default action: terminate); during
  // a round it is forwarded to the workers.
  ::signal(SIGUSR1, SIG_IGN);
  ::signal(SIGUSR2, SIG_IGN);
  const std::vector<int> stopSignals = honouredStopSignals();  // before any handler of ours
  handleStopSignalsOutsideRounds(stopSignals);
  // Before the store and any worker: no descendant of a worker outlives this agent (process_tree.h).
  ProcessTree processes(options_.shutdownTimeout, "/proc/self/exe");
  setUpStore();
  setUpMetrics();
  setUpTimeline();
  rendezvous::NodeInfo self;
  self.requestedNodeRank = options_.nodeRank;
  self.nproc = options_.nproc;
  self.hostname = net::hostname();
  self.pid = static_cast<int>(::getpid());
  if (!options_.localAddr.empty()) self.host = options_.localAddr;
  else if (options_.standalone || (hosting_ && options_.maxNodes == 1 && options_.rdzvEndpoint.empty()))
    self.host = "127.0.0.1";
  else if (hosting_) self.host = net::parseHostPort(endpoint_, rendezvous::kDefaultPort)->host;
  else self.host = self.hostname;
  self.masterPort = net::pickFreePort();

  rendezvous::RendezvousOptions ropts;
  ropts.minNodes = options_.minNodes;
  ropts.maxNodes = options_.maxNodes;
  ropts.joinTimeout = options_.rdzvTimeout;
  ropts.lastCall = options_.lastCall;
  ropts.endpoint = endpoint_;
  ropts.jobFingerprint = options_.jobFingerprint();
  ropts.agreedEnv = agreedEnvironment();
  ropts.unusableNodes = options_.unusableNodes;
  ropts.hostsStore = hosting_ && !options_.standalone;
  ropts.armStop = [](bool on) { gDeferStop = on ? 1 : 0; };
  ropts.stopPending = [] { return static_cast<int>(gDeferredStop); };
  ropts.onFirstAgent = [this] { refusals_ = rendezvous::RefusalWatcher::start(*store_); };
  rendezvous::Rendezvous rdzv(store_, ropts, self);
  // `dtrain top` and `dtrain debug dump RUN_ID` find the agents' endpoints here (one line per agent start; readers
  // keep the current ones: monitor_endpoints.h).
  if (HttpServer* server = metricsServer_ ? metricsServer_.get() : dashboardServer_.get()) {
    try {
      store_->append(kMonitorAgentsKey, monitorEndpointLine({net::joinHostPort(self.host, server->port()),
                                                              options_.nodeRank, self.pid, self.hostname}));
    } catch (const std::exception& e) {
      log::warn("could not publish the metrics endpoint for `dtrain debug dump`: {}", e.what());
    }
  }

  // A store that stops answering between rounds is a rendezvous failure (exit 4), not a collective one.
  auto storeCall = [&](auto&& call, std::string_view what) {
    try {
      return call();
    } catch (const NetworkError& e) {
      throw RendezvousError(fmt::format("lost the rendezvous store at {} while {}: {}", endpoint_, what, e.what()));
    } catch (const TimeoutError& e) {
      throw RendezvousError(fmt::format("lost the rendezvous store at {} while {}: {}", endpoint_, what, e.what()));
    }
  };
  if (options_.minNodes > 1)
    log::info("run {} at {}: waiting for {} node(s) to join (--nnodes {}, --rdzv-timeout {} s)", runId_, endpoint_,
              options_.minNodes, options_.nnodesText, options_.rdzvTimeout.count() / 1000);
  for (;;) {
    RoundInfo round;
    try {
      round = storeCall([&] { return rdzv.join(); }, "joining the group");
    } catch (const rendezvous::SpareStopped& e) {
      log::info("{}", e.what());
      stopOutsideRound(e.signal);  // not armed any more: ends the agent by the signal
    } catch (const rendezvous::JobEndedWhileWaiting& e) {
      // A spare (or a node that asked to join) whose job ended without it: it exits with the job's result. Hosting
      // the store, it first lets the round's agents finish their last reads (as a member host does); a stop signal
      // meanwhile changes nothing (gRecordStopOnly).
      gRecordStopOnly = 1;
      if (hosting_) lingerForPeers(rdzv, e.round, e.members);
      const int code = e.outcome.type == RoundEventType::kDone ? 0
                       : e.outcome.exitCode != 0               ? e.outcome.exitCode
                                                               : static_cast<int>(ExitCode::kRendezvous);
      if (code == 0) log::info("{}: the job completed without this node (exit 0)", e.what());
      else log::error("{}", e.what());
      reportStopAfterOutcome(code);
      return code;
    }
    // A stop recorded after join()'s last look (it disarmed on its way out with a round): as the signal would.
    if (gDeferredStop) stopOutsideRound(gDeferredStop);
    log::debug("round {}: node {} of {}, ranks {}..{} of {}", round.round, round.nodeRank, round.numNodes,
               round.rankOffset, round.rankOffset + options_.nproc - 1, round.worldSize);
    RoundContext ctx{&options_, &rdzv, watchStore_, &round, endpoint_, runId_, ""};
    ctx.processes = &processes;
    ctx.metrics = metrics_.get();
    ctx.stopSignals = stopSignals;
    if (!timeline_) {
      try {
        if (store_->check({kTimelineOnKey})) timeline_ = std::make_unique<TimelineCollector>("", store_);
      } catch (const std::exception& e) {
        log::warn("--timeline: could not learn whether the run records a timeline: {}", e.what());
      }
    }
    ctx.timeline = timeline_.get();
    if (metrics_) metrics_->setRound(round.round, round.restartCount, round.nodeRank, round.numNodes, round.worldSize);
    if (!options_.logDir.empty()) ctx.attemptLogDir = fmt::format("{}/{}/attempt_{}", options_.logDir, runId_, round.round);
    RoundEvent event;
    std::optional<int> interrupted;
    bool lostStore = false;
    bool workersCompleted = false;
    bool signalBeforeWorkersFinished = false;
    {
      boost::asio::io_context io;
      RoundRunner runner(io, ctx);
      event = runner.run();
      interrupted = runner.interruptedBy();
      if (!interrupted) interrupted = runner.lateStopSignal();  // came as the round ended: it still stops the job
      lostStore = runner.lostStore();
      workersCompleted = round.numNodes == 1 && runner.workersCompletedDespiteSignal();
      signalBeforeWorkersFinished = runner.interruptedBy() && !runner.signalAfterWorkersExited();
    }
    // Until the agent knows what comes next, a stop signal is recorded, not acted on (gRecordStopOnly).
    gRecordedStop = 0;
    gRecordStopOnly = 1;
    handleStopSignalsOutsideRounds(stopSignals);
    if (timeline_ && !lostStore) timeline_->afterRound(round.round, round.nodeRank, round.numNodes);
    ::signal(SIGUSR1, SIG_IGN);  // the round's signal_set restored the default action
    ::signal(SIGUSR2, SIG_IGN);
    if (!interrupted && gRecordedStop) interrupted = static_cast<int>(gRecordedStop);  // as a late stop signal
    gRecordedStop = 0;
    RestartBudget budget{round.restartCount, options_.maxRestarts, round.reformCount, options_.maxReforms,
                         options_.minNodes < options_.maxNodes};
    auto after = decideAfterRound(event, interrupted, budget, lostStore, workersCompleted, options_.dtrainWorkers);
    if (!after.exits()) {
      gRecordStopOnly = 0;  // the job goes on: a stop signal from here on ends the agent, as between rounds
      if (const int sig = gRecordedStop) stopOutsideRound(sig);  // came between the decision and this line
    }
    reportAfterRound(after, event, budget);
    if (interrupted && after.verdict == RoundVerdict::kSucceeded) {
      if (signalBeforeWorkersFinished)
        log::info("SIG{} reached the workers, but every worker exited 0: dtrain's trainer exits 0 only when its "
                  "training is complete (the model written, or a checkpoint already at the end of the run): the job "
                  "completed (exit 0)",
                  sigabbrev_np(*interrupted));
      else
        log::info("SIG{} came after every worker had finished: the job completed (exit 0)", sigabbrev_np(*interrupted));
    }
    if (metrics_ && after.verdict != RoundVerdict::kSucceeded)
      metrics_->noteEvent(fmt::format("round {}: {}{}", round.round, event.message.empty() ? "ended" : event.message,
                                      after.verdict == RoundVerdict::kRestart ? "; restarting the workers"
                                      : after.exits()                         ? "; the job ends"
                                                                              : ""));
    // A failed round: where each local rank was in its collectives (the answer to "which rank hangs").
    if (metrics_ && (after.verdict == RoundVerdict::kGiveUp || after.verdict == RoundVerdict::kRestart)) {
      auto flights = metrics_->flightRecords();
      if (!flights.empty()) {
        std::string report = analyzeFlight(std::move(flights), unixNowNs());
        if (!report.empty() && report.back() == '\n') report.pop_back();
        printBlock(log::Level::kWarn, report);
      }
    }
    if (after.exits()) {
      // A reused run id then fails at once, naming this outcome (rendezvous.h, `ended`).
      if (!lostStore) {
        RoundEvent outcome = event;
        outcome.exitCode = after.exitCode;
        if (after.verdict == RoundVerdict::kInterrupted) {
          outcome.type = RoundEventType::kShutdown;
          outcome.message = fmt::format("an agent was stopped by signal {}", after.exitCode - 128);
        }
        try {
          rdzv.recordEnd(outcome);
        } catch (const std::exception& e) {
          log::debug("could not record the end of the job: {}", e.what());
        }
      }
      bool acknowledged = false;
      if (round.numNodes > 1 && !lostStore) {
        try {
          rdzv.acknowledgeEnd(round);
          acknowledged = true;
        } catch (const std::exception& e) {
          log::debug("could not acknowledge the end of round {}: {}", round.round, e.what());
        }
      }
      if (hosting_ && !lostStore) lingerForPeers(rdzv, round.round, acknowledged ? round.numNodes : 0);
      // The other agents shipped their parts before acknowledging the end: they are in the store by now.
      if (timeline_ && timeline_->collects()) timeline_->write(options_.jobName, runId_, lostStore ? 0s : 30s);
      reportStopAfterOutcome(after.exitCode);
      return after.exitCode;
    }
    storeCall([&] { rdzv.advance(round.round, after.verdict == RoundVerdict::kRestart); }, "moving to the next round");
  }
}

}  // namespace dtrain::launch
