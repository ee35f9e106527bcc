// Monitoring end to end (docs/monitoring.md): `dtrain run --metrics-port` and `dtrain store --metrics-port`
// serve /metrics while a real job runs; `promtool check metrics` (Debian's prometheus package) lints a live
// scrape, and a real Prometheus server scrapes the job and answers a query for the step counter. The tests skip
// with a message only where those tools are not installed (scripts/setup installs them).
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <regex>
#include <set>
#include <thread>

#include "tests/integration/launch_helpers.h"
#include "tests/support/http_get.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

struct KillByRunId {
  std::string id;
  ~KillByRunId() {
    for (pid_t pid : processesWithRunId(id)) ::kill(pid, SIGKILL);
  }
};

bool installed(const char* path) { return ::access(path, X_OK) == 0; }

// A job that trains until it is stopped (many epochs of a small synthetic set), checkpointing often.
// Its output folder is inside `dir`, so tests never resume each other's checkpoints from a shared runs/ folder.
std::string longJob(const std::string& dir) {
  writeFile(dir + "/job.json", R"({
    "name": "monitored",
    "output_dir": ")" + dir + R"(/out",
    "model": {"input": [10], "layers": [{"type": "linear", "out": 1}]},
    "loss": {"type": "mse"},
    "data": {"train": {"format": "synthetic", "task": "regression", "samples": 1024, "features": 10,
                       "outputs": 1, "noise": 0.01, "seed": 7},
             "batch_size": 32},
    "optimizer": {"type": "sgd", "lr": 0.01},
    "train": {"epochs": 100000, "seed": 0},
    "checkpoint": {"dir": "ck", "every_steps": 20, "keep": 2}
  })");
  return dir + "/job.json";
}

// The port in "... serving Prometheus metrics on http://HOST:PORT/metrics".
int portFromLine(const std::string& line) {
  std::smatch m;
  REQUIRE(std::regex_search(line, m, std::regex(R"(http://[^:\s]+:(\d+)/metrics)")));
  return std::stoi(m[1]);
}

// The value of the first sample line starting with `prefix` (name and labels), or -1.
double sampleValue(const std::string& text, const std::string& prefix) {
  for (const auto& line : linesWith(text, prefix))
    if (line.rfind(prefix, 0) == 0) return std::stod(line.substr(line.rfind(' ') + 1));
  return -1;
}

// Polls `probe` (a cheap HTTP request) until it returns true or the deadline passes.
template <class F>
bool pollUntil(std::chrono::milliseconds timeout, F probe) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (probe()) return true;
    std::this_thread::sleep_for(100ms);
  }
  return false;
}

std::string urlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '_' || c == '-' || c == '.') out += static_cast<char>(c);
    else out += fmt::format("%{:02X}", c);
  }
  return out;
}

// The shipped Grafana dashboard (configs/monitoring/grafana-dashboard.json).
nlohmann::json grafanaDashboard() {
  return nlohmann::json::parse(readFile(sourceDir() + "/configs/monitoring/grafana-dashboard.json"));
}

// Every query of the Grafana dashboard (a row panel has none).
std::vector<std::string> grafanaExpressions() {
  std::vector<std::string> out;
  const nlohmann::json dashboard = grafanaDashboard();
  for (const auto& panel : dashboard["panels"])
    for (const auto& target : panel.value("targets", nlohmann::json::array()))
      out.push_back(target["expr"].get<std::string>());
  return out;
}

// The dtrain_* metric names the dashboard's queries read.
std::set<std::string> grafanaMetricNames() {
  std::set<std::string> names;
  const std::regex name(R"(\bdtrain_[a-z0-9_]+)");
  for (const auto& expr : grafanaExpressions())
    for (std::sregex_iterator it(expr.begin(), expr.end(), name), end; it != end; ++it) names.insert(it->str());
  return names;
}

// The families of an exposition ("# TYPE name type"): name -> type.
std::map<std::string, std::string> families(const std::string& scrape) {
  std::map<std::string, std::string> out;
  const std::regex type(R"(^# TYPE (\S+) (\S+)$)");
  std::smatch m;
  for (const auto& line : linesWith(scrape, "# TYPE "))
    if (std::regex_match(line, m, type)) out[m[1]] = m[2];
  return out;
}

// Whether `name` is a series name `scrape` exports: a family, or a histogram's _bucket/_sum/_count.
bool exported(const std::map<std::string, std::string>& fams, const std::string& name) {
  if (fams.count(name)) return true;
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string s = suffix;
    if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) {
      auto it = fams.find(name.substr(0, name.size() - s.size()));
      if (it != fams.end() && it->second == "histogram") return true;
    }
  }
  return false;
}

std::string promtoolProblems(const std::string& text) {
  RunOptions ro;
  ro.stdinData = text;
  auto r = run({"/usr/bin/promtool", "check", "metrics"}, ro);
  return r.exitCode == 0 ? "" : r.out + r.err;
}

// A real Prometheus server (the Debian package's) scraping the agent's /metrics at 127.0.0.1:scrapePort every
// second and answering its query API at promPort: its configuration written to DIR/prometheus.yml, its data in
// DIR/tsdb. Returns the command line for Background.
std::vector<std::string> prometheusArgs(const std::string& dir, int scrapePort, int promPort) {
  writeFile(dir + "/prometheus.yml", fmt::format(R"(global:
  scrape_interval: 1s
scrape_configs:
  - job_name: dtrain
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{}"]
)",
                                                 scrapePort));
  return {"/usr/bin/prometheus", "--config.file=" + dir + "/prometheus.yml", "--storage.tsdb.path=" + dir + "/tsdb",
          fmt::format("--web.listen-address=127.0.0.1:{}", promPort)};
}
}  // namespace

TEST_CASE("dtrain run --metrics-port: a live scrape of every rank passes promtool, and Prometheus scrapes the job") {
  std::string dir = tempDir("monitoring");
  std::string id = uniqueRunId("metrics");
  KillByRunId cleanup{id};
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "-n", "2", "--metrics-port", "0", longJob(dir)}));
  const int port = portFromLine(agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));

  // Both ranks report steps, a step-time breakdown, all-reduce totals and checkpoints.
  const std::string labels = fmt::format("job=\"monitored\",run_id=\"{}\",node=\"0\"", id);
  std::string scrape;
  REQUIRE(pollUntil(60s, [&] {
    auto r = httpGet(port, "/metrics");
    scrape = r.body;
    return r.status == 200 && sampleValue(scrape, "dtrain_checkpoints_total{" + labels + ",rank=\"1\"}") > 0 &&
           sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"0\"}") > 0;
  }));
  for (int rank : {0, 1}) {
    const std::string r = fmt::format("{},rank=\"{}\"}}", labels, rank);
    CHECK(sampleValue(scrape, "dtrain_samples_total{" + r) > 0);
    CHECK(sampleValue(scrape, "dtrain_resident_memory_bytes{" + r) > 1e6);
    // Rank 0 commits the checkpoint, so only it knows its size.
    if (rank == 0) CHECK(sampleValue(scrape, "dtrain_checkpoint_size_bytes{" + r) > 0);
    else CHECK(sampleValue(scrape, "dtrain_checkpoint_size_bytes{" + r) == 0);
    CHECK(sampleValue(scrape, fmt::format("dtrain_collective_calls_total{{{},rank=\"{}\",op=\"allreduce\"}}", labels,
                                          rank)) > 0);
    CHECK(sampleValue(scrape, fmt::format("dtrain_step_phase_seconds_total{{{},rank=\"{}\",phase=\"forward\"}}",
                                          labels, rank)) > 0);
  }
  CHECK(sampleValue(scrape, "dtrain_world_size{" + labels + "}") == 2);
  CHECK(sampleValue(scrape, "dtrain_workers_running{" + labels + "}") == 2);
  CHECK(httpGet(port, "/elsewhere").status == 404);
  if (installed("/usr/bin/promtool")) CHECK(promtoolProblems(scrape) == "");
  else MESSAGE("promtool not installed (Debian package prometheus): lint skipped");
  // Every metric the Grafana dashboard reads is one the agent exports (a misspelt name is valid PromQL that draws
  // nothing); the parameter servers' (dtrain_ps_*) are checked against a parameter-server job below.
  {
    const auto fams = families(scrape);
    for (const auto& name : grafanaMetricNames())
      if (name.rfind("dtrain_ps_", 0) != 0) CHECK_MESSAGE(exported(fams, name), name, " is not in /metrics");
  }

  if (installed("/usr/bin/prometheus")) {
    // A real Prometheus server scrapes the agent every second; its query API must then know the step counter.
    const int promPort = freePort();
    Background prometheus(prometheusArgs(dir, port, promPort));
    const std::string query = "/api/v1/query?query=" + urlEncode(fmt::format("dtrain_step{{run_id=\"{}\"}}", id));
    nlohmann::json answer;
    bool known = pollUntil(90s, [&] {
      try {
        auto r = httpGet(promPort, query, 5s);
        if (r.status != 200) return false;
        answer = nlohmann::json::parse(r.body);
        return answer["status"] == "success" && answer["data"]["result"].size() == 2;
      } catch (const std::exception&) {
        return false;  // not listening yet
      }
    });
    CHECK_MESSAGE(known, answer.dump());
    if (known) {
      for (const auto& series : answer["data"]["result"]) {
        CHECK(series["metric"]["job"] == "monitored");
        CHECK(std::stod(series["value"][1].get<std::string>()) > 0);
      }
    }
    // Every query of the shipped dashboard is valid PromQL for this server (run_id set to this run's).
    for (const auto& query : grafanaExpressions()) {
      std::string expr = std::regex_replace(query, std::regex(R"(\$run_id)"), id);
      auto r = httpGet(promPort, "/api/v1/query?query=" + urlEncode(expr), 10s);
      CHECK_MESSAGE(r.status == 200, expr, ": ", r.body);
    }
    prometheus.signal(SIGTERM);
    CHECK_FALSE(prometheus.wait(30s).timedOut);
  } else {
    MESSAGE("prometheus not installed (Debian package prometheus): the scrape by a real server was skipped");
  }

  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("a pipeline stage before the last has no loss in /metrics or the dashboard (it used to read 0); one "
          "stage counts the replica's samples") {
  std::string dir = tempDir("monitoring-pipeline");
  std::string id = uniqueRunId("metrics-pipe");
  KillByRunId cleanup{id};
  auto job = nlohmann::json::parse(readFile(longJob(dir)));
  job["model"]["layers"] = nlohmann::json::parse(R"([{"type": "linear", "out": 8}, {"type": "tanh"},
                                                     {"type": "linear", "out": 1}])");
  job["parallel"] = {{"pipeline", {{"stages", 2}, {"micro_batches", 2}}}};
  writeFile(dir + "/job.json", job.dump());
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "-n", "2", "--metrics-port", "0", "--dashboard", "0",
                            dir + "/job.json"}));
  const int port = portFromLine(agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  std::smatch m;
  const std::string dashLine = agent.waitForLine("serving the dashboard on", 60s, /*fromStderr=*/true);
  REQUIRE(std::regex_search(dashLine, m, std::regex(R"(:(\d+)/dashboard)")));
  const int dashPort = std::stoi(m[1]);
  const std::string labels = fmt::format("job=\"monitored\",run_id=\"{}\",node=\"0\"", id);
  std::string scrape;
  REQUIRE(pollUntil(60s, [&] {
    auto r = httpGet(port, "/metrics");
    scrape = r.body;
    return r.status == 200 && sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"0\"}") > 2 &&
           sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"1\"}") > 2;
  }));
  INFO(scrape);
  // Stage 0 (rank 0) computes no loss: no sample. Stage 1 (rank 1) computes it.
  CHECK(linesWith(scrape, "dtrain_loss{" + labels + ",rank=\"0\"}").empty());
  CHECK(linesWith(scrape, "dtrain_loss{" + labels + ",rank=\"1\"}").size() == 1);
  CHECK(sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"0\"}") > 0);
  // Both stages train the same batches: stage 0 counts them, so a sum over ranks is the job's throughput (it was
  // twice that).
  CHECK(sampleValue(scrape, "dtrain_samples_total{" + labels + ",rank=\"0\"}") > 0);
  CHECK(linesWith(scrape, "dtrain_samples_total{" + labels + ",rank=\"1\"}").empty());
  CHECK(linesWith(scrape, "dtrain_samples_per_second{" + labels + ",rank=\"1\"}").empty());
  if (installed("/usr/bin/promtool")) CHECK(promtoolProblems(scrape) == "");
  auto data = nlohmann::json::parse(httpGet(dashPort, "/dashboard/data.json").body);
  INFO(data.dump());
  REQUIRE(data["ranks"].size() == 2);
  for (const auto& r : data["ranks"]) {
    if (r["rank"] == 0) CHECK(r["loss"].is_null());
    else CHECK(r["loss"].is_number());
    if (r["rank"] == 0) CHECK(r["samples_per_second"].is_number());
    else CHECK(r["samples_per_second"].is_null());
  }
  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

namespace {

// longJob as an async parameter-server job with one server and no checkpoints, written to dir/job.json.
void asyncPsJob(const std::string& dir) {
  auto job = nlohmann::json::parse(readFile(longJob(dir)));
  job["parallel"] = {{"strategy", "parameter_server"}, {"servers", 1}, {"mode", "async"}};
  job["checkpoint"] = false;
  writeFile(dir + "/job.json", job.dump());
}

}  // namespace

TEST_CASE("a parameter-server job: /metrics has the servers' families (rank and role labels) and dtrain top shows "
          "the server's row") {
  std::string dir = tempDir("monitoring-ps");
  std::string id = uniqueRunId("metrics-ps");
  KillByRunId cleanup{id};
  asyncPsJob(dir);
  const std::string endpoint = fmt::format("127.0.0.1:{}", freePort());
  // 3 ranks: workers 0-1, rank 2 serves.
  Background agent(runArgs({"--rdzv-endpoint", endpoint, "--rdzv-id", id, "-n", "3", "--metrics-port", "0",
                            "--shutdown-timeout", "2s", dir + "/job.json"}));
  const int port = portFromLine(agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  const std::string server = fmt::format("job=\"monitored\",run_id=\"{}\",node=\"0\",rank=\"2\",role=\"server\","
                                         "server=\"0\"", id);
  std::string scrape;
  REQUIRE(pollUntil(60s, [&] {
    auto r = httpGet(port, "/metrics");
    scrape = r.body;
    return r.status == 200 && sampleValue(scrape, "dtrain_ps_server_requests_total{" + server + ",op=\"push\"}") > 10 &&
           sampleValue(scrape, "dtrain_ps_server_requests_per_second{" + server + "}") > 0;
  }));
  INFO(scrape);
  CHECK(sampleValue(scrape, "dtrain_ps_server_requests_total{" + server + ",op=\"pull\"}") > 0);
  CHECK(sampleValue(scrape, "dtrain_ps_server_requests_total{" + server + ",op=\"hello\"}") == 2);
  CHECK(sampleValue(scrape, "dtrain_ps_server_received_bytes_total{" + server + "}") > 0);
  CHECK(sampleValue(scrape, "dtrain_ps_server_sent_bytes_total{" + server + "}") > 0);
  CHECK(sampleValue(scrape, "dtrain_ps_server_updates_total{" + server + "}") > 0);
  CHECK(sampleValue(scrape, "dtrain_ps_workers_live{" + server + "}") == 2);
  CHECK(sampleValue(scrape, "dtrain_ps_workers_lost{" + server + "}") == 0);
  CHECK(sampleValue(scrape, "dtrain_ps_staleness_count{" + server + "}") > 0);
  CHECK(sampleValue(scrape, "dtrain_ps_staleness_max{" + server + "}") >= 0);
  // The workers keep their families; the server has none of them (it trains nothing).
  const std::string labels = fmt::format("job=\"monitored\",run_id=\"{}\",node=\"0\"", id);
  CHECK(sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"1\"}") > 0);
  CHECK(linesWith(scrape, "rank=\"2\"}").empty());
  if (installed("/usr/bin/promtool")) CHECK(promtoolProblems(scrape) == "");
  // The Grafana dashboard reads every parameter-server family the agent exports, and only those.
  const auto fams = families(scrape);
  const auto dashboardNames = grafanaMetricNames();
  std::vector<std::string> psQueries;
  for (const auto& expr : grafanaExpressions())
    if (expr.find("dtrain_ps_") != std::string::npos) psQueries.push_back(expr);
  for (const auto& name : dashboardNames)
    if (name.rfind("dtrain_ps_", 0) == 0) CHECK_MESSAGE(exported(fams, name), name, " is not in /metrics");
  for (const auto& [family, type] : fams) {
    if (family.rfind("dtrain_ps_", 0) != 0) continue;
    const bool shown = dashboardNames.count(family) > 0 ||
                       (type == "histogram" && dashboardNames.count(family + "_bucket") > 0);
    CHECK_MESSAGE(shown, family, " is exported but the Grafana dashboard shows it nowhere");
  }
  if (installed("/usr/bin/prometheus")) {
    // A real Prometheus server scrapes the job: each parameter-server query of the dashboard answers a series
    // (rates need two scrapes, so it polls).
    const int promPort = freePort();
    Background prometheus(prometheusArgs(dir, port, promPort));
    for (const auto& query : psQueries) {
      const std::string expr = std::regex_replace(query, std::regex(R"(\$run_id)"), id);
      nlohmann::json answer;
      const bool answered = pollUntil(60s, [&] {
        try {
          auto r = httpGet(promPort, "/api/v1/query?query=" + urlEncode(expr), 5s);
          if (r.status != 200) return false;
          answer = nlohmann::json::parse(r.body);
          return answer["status"] == "success" && !answer["data"]["result"].empty();
        } catch (const std::exception&) {
          return false;  // not listening yet
        }
      });
      CHECK_MESSAGE(answered, expr, ": ", answer.dump());
      if (answered && expr.find("dtrain_ps_server_requests_total") != std::string::npos) {
        bool push = false;  // the request rate by op has a push series above 0
        for (const auto& series : answer["data"]["result"])
          if (series["metric"].value("op", "") == "push" && std::stod(series["value"][1].get<std::string>()) > 0)
            push = true;
        CHECK_MESSAGE(push, answer.dump());
      }
    }
    prometheus.signal(SIGTERM);
    CHECK_FALSE(prometheus.wait(30s).timedOut);
  } else {
    MESSAGE("prometheus not installed (Debian package prometheus): the parameter-server queries were not run");
  }
  // dtrain top: the two workers as ranks, the server as a row of its own.
  auto top = run({dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--once"}, {.timeout = 30s});
  INFO(top.out, top.err);
  CHECK(top.exitCode == 0);
  CHECK(top.out.find(fmt::format("dtrain top: run {} (1 agent(s), 2 rank(s), 1 parameter server(s))", id)) !=
        std::string::npos);
  CHECK(top.out.find("server  rank   node requests/s      MB in     MB out workers live max staleness") !=
        std::string::npos);
  std::smatch m;
  CHECK(std::regex_search(top.out, m, std::regex(R"(\n     0     2      0 +(\d+) +\d+\.\d +\d+\.\d +2 +\d+\n)")));
  if (!m.empty()) CHECK(std::stoi(m[1]) > 0);
  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("dtrain store --metrics-port serves the store's counters") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"});
  const int port = portFromLine(store.waitForLine("serving Prometheus metrics on", 30s, /*fromStderr=*/true));
  auto r = httpGet(port, "/metrics");
  CHECK(r.status == 200);
  CHECK(sampleValue(r.body, "dtrain_store_connections_open") == 0);
  CHECK(sampleValue(r.body, "dtrain_store_keys") == 0);
  if (installed("/usr/bin/promtool")) CHECK(promtoolProblems(r.body) == "");
  store.signal(SIGTERM);
  auto result = store.wait(30s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 0);
}

namespace {

// `dtrain top` under script(1) (util-linux), which gives it a terminal: the live view, not one frame. script -e
// returns top's exit status. DTRAIN_TOP_TEST=<tag> marks top's process, which is not in script's process group.
std::vector<std::string> liveTop(const std::string& runId, int storePort) {
  return {"/usr/bin/script", "-qefc",
          fmt::format("{} top {} --rdzv-endpoint 127.0.0.1:{} --interval 200ms", dtrainBinary(), runId, storePort),
          "/dev/null"};
}

}  // namespace

TEST_CASE("live dtrain top shows a node that joins an elastic job after top started, and exits 10 when the job "
          "ends") {
  // top read the list of agents once, at start: a node that joined later never appeared.
  if (!installed("/usr/bin/script")) {
    MESSAGE("script not installed (Debian package util-linux): the live view was not tested");
    return;
  }
  const std::string id = uniqueRunId("top-grow");
  KillByRunId cleanup{id};
  const int storePort = freePort();
  auto agent = [&](int nodeRank) {
    return runArgs({"--nnodes", "1:2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", storePort), "--rdzv-id", id, "--rdzv-last-call",
                    "1s", "--heartbeat-timeout", "10s", "--shutdown-timeout", "2s", "--metrics-port", "0", "--", "sh",
                    "-c", "exec sleep 600"});
  };
  Background node0(agent(0));
  const int port0 = portFromLine(node0.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  Background top(liveTop(id, storePort), {.env = {{"DTRAIN_TOP_TEST", id}}});
  top.waitForLine(fmt::format("node 0 at 127.0.0.1:{}: round 0, restarts 0, 1 worker(s) running", port0), 60s);

  Background node1(agent(1));
  const int port1 = portFromLine(node1.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  // The job re-forms with both nodes (round 1); top's frames list the new agent and its node row.
  // (An agent that does not host the store publishes its host name.)
  const std::string row = top.waitForLine(fmt::format(":{}: round 1, restarts 0, 1 worker(s) running", port1), 60s);
  CHECK_MESSAGE(row.find("  node 1 at ") != std::string::npos, row);
  top.waitForLine("(2 agent(s)", 10s);

  // The job ends: the live view says so under its last frame and exits 10 (not "no answer" forever).
  node1.signal(SIGTERM);
  node0.signal(SIGTERM);
  auto r1 = node1.wait(60s);
  auto r0 = node0.wait(60s);
  CHECK(r0.exitCode == 128 + SIGTERM);
  auto t = top.wait(60s);
  INFO(t.out);
  CHECK_FALSE(t.timedOut);
  CHECK(t.exitCode == 10);
  const bool endSeen = t.out.find(fmt::format("dtrain top: run {} has ended: shutdown", id)) != std::string::npos ||
                       t.out.find(fmt::format("dtrain top: run {} is not running: its store at 127.0.0.1:{} does not "
                                              "answer",
                                              id, storePort)) != std::string::npos;
  CHECK(endSeen);
  for (pid_t pid : processesWithEnv("DTRAIN_TOP_TEST", id)) CHECK(waitForExit(pid, 10s));
  CHECK(processesWithRunId(id).empty());
}

namespace {

// A node row of `dtrain top` for the agent whose /metrics is on `port`, once its worker runs:
// "  node 1 at HOST:PORT: round R, restarts 0, 1 worker(s) running".
std::regex runningRow(int port) {
  return std::regex(fmt::format(R"(  node 1 at \S+:{}: round \d+, restarts \d+, 1 worker\(s\) running)", port));
}

}  // namespace

TEST_CASE("dtrain top and debug dump do not ask the endpoint that a restarted agent left in the store: they name it "
          "and show the live agents") {
  // A restarted agent's old endpoint stayed listed: every frame asked it ("agent ...: no answer") and counted it as
  // an agent, and its refused connection was retried up to the 5 s timeout, one stale endpoint after another.
  const std::string id = uniqueRunId("top-restart");
  KillByRunId cleanup{id};
  const int storePort = freePort();
  auto agent = [&](int nodeRank) {
    return runArgs({"--nnodes", "1:2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", storePort), "--rdzv-id", id, "--rdzv-last-call",
                    "1s", "--heartbeat-timeout", "3s", "--shutdown-timeout", "2s", "--metrics-port", "0", "--", "sh",
                    "-c", "exec sleep 600"});
  };
  auto top = [&] {
    return run({dtrainBinary(), "top", id, "--rdzv-endpoint", fmt::format("127.0.0.1:{}", storePort), "--once"},
               {.timeout = 60s});
  };
  Background node0(agent(0));
  const int port0 = portFromLine(node0.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  int oldPort = 0;
  pid_t oldPid = 0;
  {
    Background node1(agent(1));
    oldPid = node1.pid();
    oldPort = portFromLine(node1.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
    // Both nodes run a round (node 1's row shows its worker), then node 1's agent dies without a word.
    REQUIRE(pollUntil(90s, [&] { return std::regex_search(top().out, runningRow(oldPort)); }));
    node1.signal(SIGKILL);
    node1.wait(30s);
  }
  // Node 1 restarts (same --node-rank, another --metrics-port 0 port) and joins node 0 again.
  Background node1(agent(1));
  const int newPort = portFromLine(node1.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  REQUIRE(newPort != oldPort);
  RunResult t;
  REQUIRE(pollUntil(90s, [&] {
    t = top();
    return std::regex_search(t.out, runningRow(newPort));
  }));
  INFO(t.out, t.err);
  CHECK(t.exitCode == 0);
  // Two agents, both rows there; the old endpoint is named as superseded and not asked.
  CHECK(t.out.find(fmt::format("dtrain top: run {} (2 agent(s), ", id)) != std::string::npos);
  CHECK(t.out.find(fmt::format("  node 0 at 127.0.0.1:{}: round ", port0)) != std::string::npos);
  CHECK(t.out.find(fmt::format(":{} (node rank 1, pid {}): superseded by its restart at ", oldPort, oldPid)) !=
        std::string::npos);
  CHECK(t.out.find(fmt::format(":{} (pid {}), not asked", newPort, node1.pid())) != std::string::npos);
  CHECK(t.out.find("no answer") == std::string::npos);
  // dtrain debug dump reads the agents through the same code: the old endpoint is named, not asked.
  auto d = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", fmt::format("127.0.0.1:{}", storePort),
                "--interval", "0"},
               {.timeout = 60s});
  INFO(d.out, d.err);
  CHECK(d.exitCode == 0);
  CHECK(d.err.find(fmt::format(":{} (node rank 1, pid {}): superseded by its restart at ", oldPort, oldPid)) !=
        std::string::npos);
  CHECK(d.err.find("did not answer") == std::string::npos);
  node1.signal(SIGTERM);
  node0.signal(SIGTERM);
  node1.wait(60s);
  node0.wait(60s);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("dtrain top on a finished --standalone run says that the job is not running and exits 10") {
  // It failed on the token file the run had logged (removed with the store: exit 3), or said "no answer".
  const std::string id = uniqueRunId("top-over");
  KillByRunId cleanup{id};
  auto r = run(runArgs({"--standalone", "--rdzv-id", id, "--metrics-port", "0", "--", "true"}), {.timeout = 60s});
  REQUIRE(r.exitCode == 0);
  std::smatch m;
  REQUIRE_MESSAGE(std::regex_search(r.err, m,
                                    std::regex(R"(watch the job with: dtrain top \S+ --rdzv-endpoint (\S+) )"
                                               R"(--rdzv-token-file (\S+))")),
                  r.err);
  const std::string endpoint = m[1], tokenFile = m[2];
  for (const auto& extra : {std::vector<std::string>{"--rdzv-token-file", tokenFile}, std::vector<std::string>{}}) {
    std::vector<std::string> args{dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--once"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto top = run(args, {.timeout = 30s});
    INFO(top.out, top.err);
    CHECK(top.exitCode == 10);
    CHECK(top.out.find(fmt::format("dtrain top: run {} is not running: its store at {} does not answer (", id,
                                   endpoint)) != std::string::npos);
    CHECK(top.out.find("the run has ended or has not started") != std::string::npos);
  }
  // dtrain debug dump says the same (it said "cannot connect" and exited 4), at once: the refused connection is not
  // retried until its --timeout (it took the whole 10 s default).
  auto dump = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", endpoint, "--rdzv-token-file", tokenFile,
                   "--interval", "0", "--timeout", "600s"},
                  {.timeout = 30s});
  INFO(dump.out, dump.err);
  CHECK(dump.exitCode == 10);
  CHECK(dump.out.find(fmt::format("dtrain debug dump: run {} is not running: its store at {} does not answer (", id,
                                  endpoint)) != std::string::npos);
}

TEST_CASE("dtrain top on a finished run whose store lives on reads the job's outcome from it and exits 10") {
  const int storePort = freePort();
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", std::to_string(storePort)});
  store.waitForLine("listening on", 30s);
  const std::string endpoint = fmt::format("127.0.0.1:{}", storePort);
  auto job = [&](const std::string& id, const std::string& script) {
    return runArgs({"--rdzv-backend", "store", "--rdzv-endpoint", endpoint, "--rdzv-id", id, "--metrics-port", "0",
                    "--shutdown-timeout", "2s", "--", "sh", "-c", script});
  };
  auto top = [&](const std::string& id) {
    return run({dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--once"}, {.timeout = 30s});
  };
  SUBCASE("completed") {
    const std::string id = uniqueRunId("top-done");
    REQUIRE(run(job(id, "true"), {.timeout = 60s}).exitCode == 0);
    auto t = top(id);
    INFO(t.out, t.err);
    CHECK(t.exitCode == 10);  // it used to print "agent ...: no answer (connection refused)" and exit 0
    CHECK(t.out == fmt::format("dtrain top: run {} has ended: it completed (exit code 0)\n", id));
    // dtrain debug dump reads the same record (it said "no agent published a monitoring endpoint" or could not
    // reach the agents, exit 4).
    auto d = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", endpoint, "--interval", "0"},
                 {.timeout = 30s});
    INFO(d.out, d.err);
    CHECK(d.exitCode == 10);
    CHECK(d.out == fmt::format("dtrain debug dump: run {} has ended: it completed (exit code 0)\n", id));
  }
  SUBCASE("failed") {
    const std::string id = uniqueRunId("top-failed");
    REQUIRE(run(job(id, "exit 3"), {.timeout = 60s}).exitCode == 3);
    auto t = top(id);
    INFO(t.out, t.err);
    CHECK(t.exitCode == 10);
    CHECK(t.out.find(fmt::format("dtrain top: run {} has ended: failed (exit code 3)", id)) != std::string::npos);
  }
  SUBCASE("its agent was killed: no end recorded") {
    const std::string id = uniqueRunId("top-killed");
    KillByRunId cleanup{id};
    Background agent(job(id, "exec sleep 600"));
    const int port = portFromLine(agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
    auto live = top(id);
    CHECK(live.exitCode == 0);
    CHECK(live.out.find(fmt::format(":{}: round 0", port)) != std::string::npos);
    agent.signal(SIGKILL);
    CHECK(agent.wait(30s).exitCode == 128 + SIGKILL);
    auto t = top(id);
    INFO(t.out, t.err);
    CHECK(t.exitCode == 10);
    CHECK(t.out.find(fmt::format("dtrain top: run {} is not running: none of its agents answers (", id)) !=
          std::string::npos);
    CHECK(t.out.find(fmt::format(":{}: cannot connect", port)) != std::string::npos);
    CHECK(t.out.find(fmt::format("and its store at {} records no end of the job", endpoint)) != std::string::npos);
    // dtrain debug dump says the same, after its first read (it printed a report of 0 ranks and exited 0).
    auto d = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", endpoint, "--interval", "600s"},
                 {.timeout = 30s});
    INFO(d.out, d.err);
    CHECK(d.exitCode == 10);
    CHECK(d.out.find(fmt::format("dtrain debug dump: run {} is not running: none of its agents answers (", id)) !=
          std::string::npos);
    CHECK(d.out.find(fmt::format(":{}: cannot connect", port)) != std::string::npos);
    CHECK(d.out.find(fmt::format("and its store at {} records no end of the job", endpoint)) != std::string::npos);
  }
  store.signal(SIGTERM);
  CHECK_FALSE(store.wait(30s).timedOut);
}

TEST_CASE("dtrain top shows an agent that is in no round yet as waiting, not as a second node 0 of round -1") {
  // An agent waiting in the rendezvous (for the round to close, or as an elastic job's spare) has no node rank: top
  // printed "node 0 at HOST:PORT: round -1, ..." beside the real node 0.
  const std::string id = uniqueRunId("top-waiting");
  KillByRunId cleanup{id};
  const int storePort = freePort();
  Background node0(runArgs({"--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                            fmt::format("127.0.0.1:{}", storePort), "--rdzv-id", id, "--metrics-port", "0", "--",
                            "true"}));
  const int port0 = portFromLine(node0.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  node0.waitForLine("waiting for 2 node(s) to join", 60s, /*fromStderr=*/true);
  auto t = run({dtrainBinary(), "top", id, "--rdzv-endpoint", fmt::format("127.0.0.1:{}", storePort), "--once"},
               {.timeout = 30s});
  INFO(t.out, t.err);
  CHECK(t.exitCode == 0);
  CHECK(t.out.find(fmt::format("  agent at 127.0.0.1:{}: in no round yet (waiting in the rendezvous: for the round "
                               "to close, or as a spare for a later round), 0 worker(s) running",
                               port0)) != std::string::npos);
  CHECK(t.out.find("round -1") == std::string::npos);
  node0.signal(SIGTERM);
  auto r = node0.wait(30s);
  CHECK(r.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("a worker that ended reads 0 samples/s: an async parameter-server job that goes on without it does not "
          "count its last rate") {
  // The block of a worker that died kept its last samples/s, so /metrics, `dtrain top`'s "all" row and the
  // dashboard went on adding it to the job's throughput while the others trained without it.
  std::string dir = tempDir("monitoring-ps-lost");
  std::string id = uniqueRunId("metrics-ps-lost");
  KillByRunId cleanup{id};
  asyncPsJob(dir);
  const std::string endpoint = fmt::format("127.0.0.1:{}", freePort());
  // 3 ranks: workers 0-1, rank 2 serves; worker 1 kills itself after step 5 and worker 0 trains on.
  Background agent(runArgs({"--rdzv-endpoint", endpoint, "--rdzv-id", id, "-n", "3", "--metrics-port", "0",
                            "--shutdown-timeout", "2s", dir + "/job.json"}),
                   {.env = {{"DTRAIN_FAULT", "rank=1,step=5,action=kill"}}});
  const int port = portFromLine(agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true));
  agent.waitForLine("rank 1 (a parameter-server worker) ended", 60s, /*fromStderr=*/true);
  const std::string labels = fmt::format("job=\"monitored\",run_id=\"{}\",node=\"0\"", id);
  std::string scrape;
  double step0 = -1;
  REQUIRE(pollUntil(60s, [&] {
    scrape = httpGet(port, "/metrics").body;
    if (step0 < 0) step0 = sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"0\"}");
    return sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"0\"}") > step0 + 10;  // worker 0 trains on
  }));
  INFO(scrape);
  CHECK(sampleValue(scrape, "dtrain_samples_per_second{" + labels + ",rank=\"0\"}") > 0);
  CHECK(sampleValue(scrape, "dtrain_samples_per_second{" + labels + ",rank=\"1\"}") == 0);
  CHECK(sampleValue(scrape, "dtrain_step{" + labels + ",rank=\"1\"}") >= 1);  // its other values stay readable
  agent.signal(SIGTERM);
  agent.wait(60s);
  CHECK(processesWithRunId(id).empty());
}
