// `dtrain debug dump RUN_ID --rdzv-endpoint HOST:PORT`: which rank hangs, and where. Reads the agents' monitoring
// endpoints from the run's store (agents started with --metrics-port publish them), gathers every rank's flight
// recorder from them (/debug/flight.json, every agent at once) and prints lib/launch/flight_report.h's analysis.
// Endpoints that an agent's restart left in the store are named on stderr and not asked.
#include <atomic>
#include <filesystem>
#include <map>
#include <thread>

#include "apps/dtrain/commands.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/parse.h"
#include "lib/launch/flight_report.h"
#include "lib/launch/http_server.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/rendezvous.h"
#include "rendezvous/tcp_store_client.h"

namespace dtrain::app {

namespace {

struct DebugArgs {
  std::string runId;
  std::string endpoint = "127.0.0.1";
  std::string token, tokenFile;
  std::string timeout = "10s";
  std::string interval = "1s";
};

}  // namespace

MonitoredRun readMonitoredRun(const std::string& runId, const std::string& endpoint, const std::string& token,
                              std::chrono::milliseconds timeout) {
  auto hp = net::parseHostPort(endpoint, rendezvous::kDefaultPort);
  DTRAIN_CHECK_AS(UsageError, hp.has_value(), "--rdzv-endpoint {}: expected HOST[:PORT]", endpoint);
  rendezvous::TcpStoreClientOptions co;
  co.host = hp->host;
  co.port = hp->port;
  co.connectTimeout = timeout;
  co.timeout = timeout;
  // Nothing listening means the store went with its job (or is not up yet): say so now, not after `timeout`.
  co.retry = false;
  if (!token.empty()) co.token = token;
  std::shared_ptr<rendezvous::TcpStoreClient> client;
  try {
    client = rendezvous::TcpStoreClient::connect(co);
  } catch (const rendezvous::StoreAuthError&) {
    throw;  // it answered: the token is wrong or missing
  } catch (const RendezvousError& e) {  // nothing listens there, or it did not answer the handshake in time
    throw StoreNotAnswering(e.what());
  }
  rendezvous::PrefixStore store(rendezvous::runPrefix(runId), client);
  std::vector<rendezvous::StoreResult> got;
  try {
    got = store.batch({rendezvous::StoreOp::tryGet(launch::kMonitorAgentsKey), rendezvous::StoreOp::tryGet("ended"),
                       rendezvous::StoreOp::tryGet("job")});
  } catch (const NetworkError& e) {  // it closed (its job ending) between the handshake and the reply
    throw StoreNotAnswering(e.what());
  } catch (const TimeoutError& e) {
    throw StoreNotAnswering(e.what());
  }
  MonitoredRun run;
  run.ended = got[1].value;
  auto endpoints = launch::currentMonitorEndpoints(got[0].value.value_or(""));
  for (auto& e : endpoints.current) run.agents.push_back(std::move(e.address));
  run.superseded = std::move(endpoints.superseded);
  // No "job" key: no agent ever joined this run id on this store (a typo in RUN_ID, or another store).
  DTRAIN_CHECK_AS(RendezvousError, !run.agents.empty() || run.ended || got[2].value,
                  "run {} at {}: no such run on this store (no agent has joined run id '{}'; check RUN_ID: it is "
                  "--rdzv-id, or the Slurm job id and step)",
                  runId, hp->str(), runId);
  return run;
}

std::string storeSilentLine(const std::string& command, const std::string& runId, const std::string& endpoint,
                            const StoreNotAnswering& e) {
  return fmt::format("{}: run {} is not running: its store at {} does not answer ({}): the run has ended or has not "
                     "started\n",
                     command, runId, endpoint, e.what());
}

std::string endedLine(const std::string& command, const std::string& runId, const std::string& record) {
  std::string how;
  try {
    auto e = rendezvous::RoundEvent::fromJson(record);
    how = e.type == rendezvous::RoundEventType::kDone
              ? fmt::format(": it completed (exit code {})", e.exitCode)
              : fmt::format(": {} (exit code {}){}", rendezvous::roundEventName(e.type), e.exitCode,
                            e.message.empty() ? "" : ": " + e.message);
  } catch (const std::exception&) {  // a record this dtrain cannot read: still an end
  }
  return fmt::format("{}: run {} has ended{}\n", command, runId, how);
}

std::string agentsSilentLine(const std::string& command, const std::string& runId, const std::string& endpoint,
                             const std::string& token, std::chrono::milliseconds timeout,
                             const std::vector<std::string>& silent) {
  MonitoredRun run;
  try {
    run = readMonitoredRun(runId, endpoint, token, timeout);
  } catch (const StoreNotAnswering& e) {
    return storeSilentLine(command, runId, endpoint, e);
  }
  if (run.ended) return endedLine(command, runId, *run.ended);
  return fmt::format("{}: run {} is not running: none of its agents answers ({}), and its store at {} records no end "
                     "of the job: the agents were killed or lost the store\n",
                     command, runId, fmt::join(silent, "; "), endpoint);
}

std::optional<std::string> tokenOrNotRunning(const std::string& command, const std::string& runId,
                                             const std::string& endpoint, const std::string& tokenFlag,
                                             const std::string& tokenFile, std::chrono::milliseconds timeout,
                                             std::string& token) {
  try {
    token = resolveRdzvToken(tokenFlag, tokenFile);
    return std::nullopt;
  } catch (const UsageError&) {
    std::error_code ec;
    if (tokenFile.empty() || std::filesystem::exists(tokenFile, ec)) throw;
    try {
      readMonitoredRun(runId, endpoint, "", timeout);
    } catch (const StoreNotAnswering& e) {
      return storeSilentLine(command, runId, endpoint, e);
    } catch (const std::exception&) {
    }
    throw;
  }
}

std::vector<AgentReply> askAgents(const std::vector<std::string>& agents, const std::string& target,
                                  std::chrono::milliseconds timeout) {
  std::vector<AgentReply> replies(agents.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < agents.size();) {
      AgentReply& r = replies[i];
      r.agent = agents[i];
      try {
        auto ap = net::parseHostPort(agents[i], 0);
        if (!ap) throw Error(fmt::format("'{}' is not HOST:PORT", agents[i]));
        auto reply = launch::httpGet(ap->host, ap->port, target, timeout);
        if (reply.status != 200) throw Error(fmt::format("HTTP status {}", reply.status));
        r.body = std::move(reply.body);
      } catch (const std::exception& e) {
        r.error = e.what();
      }
    }
  };
  // Concurrently: one agent that does not answer (a frozen agent, a host that is down) costs a frame one timeout,
  // not one per agent after it.
  std::vector<std::thread> threads;
  try {
    for (size_t t = 1; t < std::min(agents.size(), kMaxAgentProbes); ++t) threads.emplace_back(work);
  } catch (const std::system_error&) {  // out of threads: the ones started (and this one) share the work
  }
  work();
  for (auto& t : threads) t.join();
  return replies;
}

std::string supersededLine(const launch::SupersededEndpoint& s) {
  return fmt::format("agent {} (node rank {}{}): superseded by its restart at {}{}, not asked", s.old.address,
                     s.old.nodeRank, s.old.pid > 0 ? fmt::format(", pid {}", s.old.pid) : "", s.by.address,
                     s.by.pid > 0 ? fmt::format(" (pid {})", s.by.pid) : "");
}

namespace {

// Every rank's record, from every agent that answers; the ones that do not are named on stderr (reportSilent) and
// their "host:port: reason" added to `silent`.
std::vector<launch::RankFlight> gatherFlights(const std::vector<std::string>& agents, std::chrono::milliseconds timeout,
                                              bool reportSilent, std::vector<std::string>& silent) {
  std::vector<launch::RankFlight> ranks;
  std::map<int, size_t> byRank;  // two agents reporting one rank (should not happen): keep the later one's
  for (const auto& reply : askAgents(agents, "/debug/flight.json", timeout)) {
    try {
      if (!reply.body) throw Error(reply.error);
      for (const auto& j : nlohmann::json::parse(*reply.body)) {
        auto r = launch::rankFlightFromJson(j);
        if (auto it = byRank.find(r.rank); it != byRank.end()) ranks[it->second] = std::move(r);
        else {
          byRank[r.rank] = ranks.size();
          ranks.push_back(std::move(r));
        }
      }
    } catch (const std::exception& e) {
      if (reportSilent) fmt::print(stderr, "dtrain debug dump: agent at {} did not answer: {}\n", reply.agent, e.what());
      silent.push_back(fmt::format("{}: {}", reply.agent, e.what()));
    }
  }
  return ranks;
}

int runDump(const DebugArgs& a) {
  const auto timeout = parse::durationFlag("--timeout", a.timeout);
  const auto interval = parse::durationFlag("--interval", a.interval);
  std::string token;
  if (auto over = tokenOrNotRunning("dtrain debug dump", a.runId, a.endpoint, a.token, a.tokenFile, timeout, token)) {
    fmt::print("{}", *over);
    return kExitJobNotRunning;
  }
  // A job that is not running has no ranks to dump: said so as `dtrain top` says it (exit 10), not as a failure to
  // reach it (it said "cannot connect", exit 4).
  MonitoredRun run;
  try {
    run = readMonitoredRun(a.runId, a.endpoint, token, timeout);
  } catch (const StoreNotAnswering& e) {
    fmt::print("{}", storeSilentLine("dtrain debug dump", a.runId, a.endpoint, e));
    return kExitJobNotRunning;
  }
  if (run.ended) {
    fmt::print("{}", endedLine("dtrain debug dump", a.runId, *run.ended));
    return kExitJobNotRunning;
  }
  DTRAIN_CHECK_AS(RendezvousError, !run.agents.empty(),
                  "run {} at {}: no agent published a monitoring endpoint (start `dtrain run` with --metrics-port)",
                  a.runId, a.endpoint);
  const auto& agents = run.agents;
  for (const auto& s : run.superseded) fmt::print(stderr, "dtrain debug dump: {}\n", supersededLine(s));
  // No agent answers: the job ended since the store was read, or its agents are gone without recording an end; said
  // as `dtrain top` says it (exit 10), not as an empty report (exit 0), and without waiting out `interval`.
  auto notRunning = [&](const std::vector<std::string>& silent) {
    fmt::print("{}", agentsSilentLine("dtrain debug dump", a.runId, a.endpoint, token, timeout, silent));
    return kExitJobNotRunning;
  };
  std::vector<std::string> silent;
  if (interval.count() == 0) {
    auto ranks = gatherFlights(agents, timeout, true, silent);
    if (silent.size() == agents.size()) return notRunning(silent);
    fmt::print("{}", launch::analyzeFlight(std::move(ranks), launch::unixNowNs()));
    return 0;
  }
  // Two reads, `interval` apart: a rank that moved in between is not hung (analyzeFlight).
  const auto first = gatherFlights(agents, timeout, false, silent);
  if (silent.size() == agents.size()) return notRunning(silent);
  const auto firstAt = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(interval);
  silent.clear();
  auto second = gatherFlights(agents, timeout, true, silent);
  if (silent.size() == agents.size()) return notRunning(silent);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - firstAt).count();
  fmt::print("{}", launch::analyzeFlight(std::move(second), launch::unixNowNs(), &first, seconds));
  return 0;
}

}  // namespace

void addDebugCommand(CLI::App& root, Action& action) {
  auto* debug = root.add_subcommand("debug", "Diagnose a running job");
  debug->require_subcommand(1);
  auto a = std::make_shared<DebugArgs>();
  auto* dump = debug->add_subcommand(
      "dump", "Gather every rank's last collective calls and say which ranks are behind, at which call and step");
  dump->add_option("run_id", a->runId, "The job's --rdzv-id")->required();
  dump->add_option("--rdzv-endpoint", a->endpoint, "The run's rendezvous store HOST[:PORT]")->capture_default_str();
  dump->add_option("--rdzv-token", a->token, "The store's shared secret")->envname("DTRAIN_RDZV_TOKEN");
  dump->add_option("--rdzv-token-file", a->tokenFile, "Read the store's shared secret from this file");
  dump->add_option("--timeout", a->timeout, "Budget for the store and each agent")->capture_default_str();
  dump->add_option("--interval", a->interval,
                   "Read the ranks twice, this long apart, to tell a running job from a hung one (0: read once)")
      ->capture_default_str();
  dump->footer(exitCodesHelp({{"0", "the ranks' report was printed"},
                              {"1", ""},
                              {"3", ""},
                              {"4", "wrong or missing --rdzv-token, or no agent of the run published an endpoint"},
                              {"6", ""},
                              {"10", ""}}));
  dump->callback([&action, a] { action = [a] { return runDump(*a); }; });
}

}  // namespace dtrain::app
