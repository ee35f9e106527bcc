// `dtrain top RUN_ID --rdzv-endpoint HOST:PORT`: a terminal view of a running job (nvidia-smi's one glance): per
// rank its node, step, epoch, loss, samples/s and the age of its last report; per parameter server its requests/s,
// bytes in and out, live (and lost) workers and the largest staleness it answered; per node the round, restarts
// and heartbeat ages. Reads the agents' /metrics (agents started with --metrics-port publish their endpoints in the
// run's store; read again every frame, so that agents joining later show up; all at once, without the endpoints
// that an agent's restart left behind) and redraws in place every --interval;
// --once prints one view and exits. A job that is not running (ended, or its store or agents do not answer) is
// said so, and exits kExitJobNotRunning (10).
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>

#include <fmt/ranges.h>

#include "apps/dtrain/commands.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::app {

namespace {

struct TopArgs {
  std::string runId;
  std::string endpoint = "127.0.0.1";
  std::string token, tokenFile;
  std::string interval = "1s";
  bool once = false;
};

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// The sample lines of a text exposition (comments skipped).
std::vector<Sample> parseExposition(const std::string& text) {
  static const std::regex line(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$)");
  static const std::regex label(R"re(([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)")re");
  std::vector<Sample> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) {
    std::smatch m;
    if (l.empty() || l[0] == '#' || !std::regex_match(l, m, line)) continue;
    Sample s{m[1], {}, std::strtod(m[3].str().c_str(), nullptr)};
    const std::string labels = m[2];
    for (auto it = std::sregex_iterator(labels.begin(), labels.end(), label); it != std::sregex_iterator(); ++it)
      s.labels[(*it)[1]] = (*it)[2];
    out.push_back(std::move(s));
  }
  return out;
}

// The frame for `run`'s agents (asked at once, askAgents); each agent that does not answer gets a line in it and its
// "host:port: reason" in `silent`; each endpoint an agent's restart left behind, a line saying it was not asked.
std::string view(const TopArgs& a, const MonitoredRun& run, std::chrono::milliseconds timeout,
                 std::vector<std::string>& silent) {
  struct Rank {
    std::string node;
    double step = 0, epoch = 0, updated = 0;
    std::optional<double> loss;  // none: the rank computes no loss (a pipeline stage before the last)
    std::optional<double> sps;   // none: another rank of its data replica counts its samples (model parallelism)
  };
  std::map<int, Rank> ranks;
  // Parameter-server ranks (role="server" in /metrics): their traffic and workers instead of training figures.
  struct Server {
    std::string node, server;
    double rps = 0, in = 0, out = 0, live = 0, lost = 0, staleness = 0;
  };
  std::map<int, Server> servers;
  std::string nodes;
  for (const auto& reply : askAgents(run.agents, "/metrics", timeout)) {
    const std::string& agent = reply.agent;
    if (!reply.body) {
      nodes += fmt::format("  agent {}: no answer ({})\n", agent, reply.error);
      silent.push_back(fmt::format("{}: {}", agent, reply.error));
      continue;
    }
    const std::vector<Sample> samples = parseExposition(*reply.body);
    std::map<std::string, double> agentValues;
    std::string hb;
    for (const auto& s : samples) {
      if (s.labels.count("rank") && s.labels.count("role") && s.labels.at("role") == "server") {
        Server& v = servers[std::stoi(s.labels.at("rank"))];
        v.node = s.labels.count("node") ? s.labels.at("node") : "?";
        v.server = s.labels.count("server") ? s.labels.at("server") : "?";
        if (s.name == "dtrain_ps_server_requests_per_second") v.rps = s.value;
        else if (s.name == "dtrain_ps_server_received_bytes_total") v.in = s.value;
        else if (s.name == "dtrain_ps_server_sent_bytes_total") v.out = s.value;
        else if (s.name == "dtrain_ps_workers_live") v.live = s.value;
        else if (s.name == "dtrain_ps_workers_lost") v.lost = s.value;
        else if (s.name == "dtrain_ps_staleness_max") v.staleness = s.value;
      } else if (s.labels.count("rank")) {
        Rank& r = ranks[std::stoi(s.labels.at("rank"))];
        r.node = s.labels.count("node") ? s.labels.at("node") : "?";
        if (s.name == "dtrain_step") r.step = s.value;
        else if (s.name == "dtrain_epoch") r.epoch = s.value;
        else if (s.name == "dtrain_loss") r.loss = s.value;
        else if (s.name == "dtrain_samples_per_second") r.sps = s.value;
        else if (s.name == "dtrain_worker_last_update_timestamp_seconds") r.updated = s.value;
      } else if (s.name == "dtrain_heartbeat_age_seconds") {
        hb += fmt::format(" node {} {:.1f}s", s.labels.count("peer_node") ? s.labels.at("peer_node") : "?", s.value);
      } else {
        agentValues[s.name] = s.value;
        if (s.labels.count("node")) agentValues["node"] = std::stod(s.labels.at("node"));
      }
    }
    if (agentValues["dtrain_round"] < 0) {
      // Not in a round yet: it has no node rank (its `node` label reads 0 beside the real node 0), no workers.
      nodes += fmt::format("  agent at {}: in no round yet (waiting in the rendezvous: for the round to close, or as "
                           "a spare for a later round), 0 worker(s) running\n",
                           agent);
      continue;
    }
    nodes += fmt::format("  node {} at {}: round {}, restarts {}, {} worker(s) running{}\n", agentValues["node"], agent,
                         agentValues["dtrain_round"], agentValues["dtrain_restarts_total"],
                         agentValues["dtrain_workers_running"], hb.empty() ? "" : "; heartbeat ages:" + hb);
  }
  for (const auto& s : run.superseded) nodes += fmt::format("  {}\n", supersededLine(s));
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string out = fmt::format("dtrain top: run {} ({} agent(s), {} rank(s){})\n{}\n", a.runId, run.agents.size(),
                                ranks.size(),
                                servers.empty() ? "" : fmt::format(", {} parameter server(s)", servers.size()), nodes);
  out += fmt::format("{:>6} {:>5} {:>10} {:>6} {:>12} {:>12} {:>12}\n", "rank", "node", "step", "epoch", "loss",
                     "samples/s", "last report");
  double total = 0;
  for (const auto& [rank, r] : ranks) {
    total += r.sps.value_or(0.0);
    out += fmt::format("{:>6} {:>5} {:>10.0f} {:>6.0f} {:>12} {:>12} {:>10.1f} s\n", rank, r.node, r.step,
                       r.epoch + 1, r.loss ? fmt::format("{:.6g}", *r.loss) : "-",
                       r.sps ? fmt::format("{:.0f}", *r.sps) : "-", r.updated > 0 ? now - r.updated : 0.0);
  }
  out += fmt::format("{:>6} {:>5} {:>10} {:>6} {:>12} {:>12.0f}\n", "all", "", "", "", "", total);
  if (!servers.empty()) {
    out += fmt::format("\n{:>6} {:>5} {:>6} {:>10} {:>10} {:>10} {:>12} {:>13}\n", "server", "rank", "node",
                       "requests/s", "MB in", "MB out", "workers live", "max staleness");
    for (const auto& [rank, v] : servers)
      out += fmt::format("{:>6} {:>5} {:>6} {:>10.0f} {:>10.1f} {:>10.1f} {:>12} {:>13.0f}\n", v.server, rank, v.node,
                         v.rps, v.in / 1e6, v.out / 1e6,
                         fmt::format("{:.0f}{}", v.live, v.lost > 0 ? fmt::format(" ({:.0f} lost)", v.lost) : ""),
                         v.staleness);
  }
  return out;
}

// One look at the job: a frame to show, or (notRunning) the line saying why there is none.
struct Look {
  std::string text;
  bool notRunning = false;
};

Look storeSilent(const TopArgs& a, const StoreNotAnswering& e) {
  return {storeSilentLine("dtrain top", a.runId, a.endpoint, e), true};
}

Look ended(const TopArgs& a, const std::string& record) { return {endedLine("dtrain top", a.runId, record), true}; }

// Reads the run's agents and end record from its store every time (an elastic job's agents join later), then
// the agents' /metrics.
Look look(const TopArgs& a, const std::string& token, std::chrono::milliseconds timeout) {
  MonitoredRun run;
  try {
    run = readMonitoredRun(a.runId, a.endpoint, token, timeout);
  } catch (const StoreNotAnswering& e) {
    return storeSilent(a, e);
  }
  if (run.ended) return ended(a, *run.ended);
  DTRAIN_CHECK_AS(RendezvousError, !run.agents.empty(),
                  "run {} at {}: no agent published a monitoring endpoint (start `dtrain run` with --metrics-port)",
                  a.runId, a.endpoint);
  std::vector<std::string> silent;
  std::string frame = view(a, run, timeout, silent);
  if (silent.size() < run.agents.size()) return {std::move(frame), false};
  // No agent answers: the job ended since the store was read (its agents record the end before they exit), or
  // its agents stopped without recording one.
  return {agentsSilentLine("dtrain top", a.runId, a.endpoint, token, timeout, silent), true};
}

int runTop(const TopArgs& a) {
  const auto interval = parse::durationFlag("--interval", a.interval);
  const auto timeout = std::chrono::milliseconds(5000);
  std::string token;
  if (auto over = tokenOrNotRunning("dtrain top", a.runId, a.endpoint, a.token, a.tokenFile, timeout, token)) {
    fmt::print("{}", *over);
    return kExitJobNotRunning;
  }
  if (a.once || !::isatty(STDOUT_FILENO)) {
    Look l = look(a, token, timeout);
    fmt::print("{}", l.text);
    return l.notRunning ? kExitJobNotRunning : 0;
  }
  for (;;) {  // until Ctrl-C or the job's end: redraw in place
    Look l = look(a, token, timeout);
    // The job's end goes under its last frame (kept on the screen).
    fmt::print("{}{}", l.notRunning ? "" : "\033[H\033[2J", l.text);
    std::fflush(stdout);
    if (l.notRunning) return kExitJobNotRunning;
    std::this_thread::sleep_for(interval);
  }
}

}  // namespace

void addTopCommand(CLI::App& root, Action& action) {
  auto a = std::make_shared<TopArgs>();
  auto* sub = root.add_subcommand("top", "A live terminal view of a running job (agents need --metrics-port)");
  sub->add_option("run_id", a->runId, "The job's --rdzv-id")->required();
  sub->add_option("--rdzv-endpoint", a->endpoint, "The run's rendezvous store HOST[:PORT]")->capture_default_str();
  sub->add_option("--rdzv-token", a->token, "The store's shared secret")->envname("DTRAIN_RDZV_TOKEN");
  sub->add_option("--rdzv-token-file", a->tokenFile, "Read the store's shared secret from this file");
  sub->add_option("--interval", a->interval, "Refresh period")->capture_default_str();
  sub->add_flag("--once", a->once, "Print one view and exit (also when stdout is not a terminal)");
  sub->footer(exitCodesHelp({{"0", "the job is running (its view was printed)"},
                             {"1", ""},
                             {"3", ""},
                             {"4", "wrong or missing --rdzv-token, or no agent of the run published an endpoint"},
                             {"6", ""},
                             {"10", ""}}));
  sub->callback([&action, a] { action = [a] { return runTop(*a); }; });
}

}  // namespace dtrain::app
