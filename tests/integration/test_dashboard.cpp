// `dtrain run --dashboard PORT` end to end: a real 2-rank job serves the page, Chart.js (Debian's libjs-chart.js)
// and the JSON it polls; a real headless browser (Debian's chromium) loads the page against the running job and
// the charts lay out the points that arrived (the page counts them into #rendered), and a screenshot is taken.
// The browser part skips with a message where chromium is not installed (scripts/setup installs it). A
// parameter-server job's page has a section per server, with the figures of the running servers.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <regex>
#include <set>
#include <thread>

#include "lib/launch/dashboard.h"
#include "tests/integration/launch_helpers.h"
#include "tests/support/http_get.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

constexpr const char* kChromium = "/usr/bin/chromium";

struct KillByRunId {
  std::string id;
  ~KillByRunId() {
    for (pid_t pid : processesWithRunId(id)) ::kill(pid, SIGKILL);
  }
};

// `parallel`: the job's "parallel" section (none when empty); `layers`: the model's layers.
std::string endlessJob(const std::string& dir, const std::string& parallel = "",
                       const std::string& layers = R"([{"type": "linear", "out": 1}])") {
  writeFile(dir + "/job.json", R"({
    "name": "watched",
    "output_dir": ")" + dir + R"(/out",
    "model": {"input": [10], "layers": )" + layers + R"(},
    "loss": {"type": "mse"},
    "data": {"train": {"format": "synthetic", "task": "regression", "samples": 1024, "features": 10,
                       "outputs": 1, "noise": 0.01, "seed": 7},
             "batch_size": 32},
    "optimizer": {"type": "sgd", "lr": 0.01},
    "train": {"epochs": 100000, "seed": 0},
    "checkpoint": false)" + (parallel.empty() ? "" : ",\n    \"parallel\": " + parallel) + R"(
  })");
  return dir + "/job.json";
}

// Every rank in data.json has at least `points` points of history.
bool historyOf(int port, int ranks, size_t points, nlohmann::json* data) {
  try {
    auto r = httpGet(port, "/dashboard/data.json", 5s);
    if (r.status != 200) return false;
    *data = nlohmann::json::parse(r.body);
    if (static_cast<int>((*data)["ranks"].size()) != ranks) return false;
    for (const auto& rank : (*data)["ranks"])
      if (rank["history"]["step"].size() < points) return false;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

std::vector<std::string> chromium(const std::string& profile, std::vector<std::string> extra) {
  std::vector<std::string> argv = {kChromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                   "--no-first-run", "--user-data-dir=" + profile};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

// The port of the dashboard `agent` logs that it serves (0 was asked: the agent picked a free one).
int dashboardPort(Background& agent) {
  std::smatch m;
  const std::string line = agent.waitForLine("serving the dashboard on", 60s, /*fromStderr=*/true);
  REQUIRE(std::regex_search(line, m, std::regex(R"(http://[^:\s]+:(\d+)/dashboard)")));
  return std::stoi(m[1]);
}

}  // namespace

TEST_CASE("dtrain run --dashboard: a live page whose charts a headless browser draws from the running job") {
  std::string dir = tempDir("dashboard");
  std::string id = uniqueRunId("dashboard");
  KillByRunId cleanup{id};
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "-n", "2", "--dashboard", "0", endlessJob(dir)}));
  const int port = dashboardPort(agent);

  nlohmann::json data;
  bool ready = false;
  for (auto end = std::chrono::steady_clock::now() + 90s; !ready && std::chrono::steady_clock::now() < end;) {
    ready = historyOf(port, 2, 2, &data);
    if (!ready) std::this_thread::sleep_for(200ms);
  }
  REQUIRE_MESSAGE(ready, data.dump());
  CHECK(data["job"] == "watched");
  CHECK(data["run_id"] == id);
  CHECK(data["world_size"] == 2);
  CHECK(data["workers_running"] == 2);
  for (const auto& rank : data["ranks"]) {
    CHECK(rank["step"].get<int>() > 0);
    CHECK(rank["history"]["loss"].size() == rank["history"]["step"].size());
  }
  auto page = httpGet(port, "/dashboard");
  CHECK(page.status == 200);
  CHECK(page.body.find("/dashboard/chart.js") != std::string::npos);
  CHECK(page.body.find("https://") == std::string::npos);  // nothing from the network
  CHECK(httpGet(port, "/metrics").status == 200);          // the same server serves the metrics

  if (::access(dtrain::launch::kChartJsPath, R_OK) != 0 || ::access(kChromium, X_OK) != 0) {
    MESSAGE("chromium or libjs-chart.js not installed (Debian packages chromium, libjs-chart.js): the browser check "
            "was skipped");
  } else {
    auto js = httpGet(port, "/dashboard/chart.js");
    CHECK(js.status == 200);
    CHECK(js.body.find("Chart.js") != std::string::npos);
    const std::string url = fmt::format("http://127.0.0.1:{}/dashboard", port);
    // The DOM after a few seconds of the page's (virtual) time: the charts' laid-out points are counted there.
    auto dom = run(chromium(dir + "/profile", {"--virtual-time-budget=5000", "--dump-dom", url}), {.timeout = 180s});
    INFO(dom.err);
    REQUIRE(dom.exitCode == 0);
    std::smatch points;
    REQUIRE(std::regex_search(dom.out, points, std::regex(R"re(id="rendered" data-points="(\d+)" data-polls="(\d+)")re")));
    CHECK(std::stoi(points[1]) >= 8);  // 2 charts x 2 ranks x at least 2 points
    CHECK(std::stoi(points[2]) >= 1);
    auto shot = run(chromium(dir + "/profile", {"--virtual-time-budget=3000", "--window-size=1280,900",
                                                "--screenshot=" + dir + "/dashboard.png", url}),
                    {.timeout = 180s});
    CHECK_MESSAGE(shot.exitCode == 0, shot.err);
    const std::string png = readFile(dir + "/dashboard.png");
    CHECK(png.size() > 10000);
    CHECK(png.compare(0, 4, "\x89PNG") == 0);
  }

  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("dtrain run --dashboard of an agent in no round yet: the page says it is waiting, not node 0 of round -1") {
  // An agent waiting in the rendezvous (for its round to close, or an elastic job's spare) has no node rank yet: the
  // page's title said "node 0" and its node row "round -1" (`dtrain top` says "in no round yet" since a309d62).
  std::string dir = tempDir("dashboard-waiting");
  std::string id = uniqueRunId("dashboard-waiting");
  KillByRunId cleanup{id};
  Background agent(runArgs({"--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                            fmt::format("127.0.0.1:{}", freePort()), "--rdzv-id", id, "--dashboard", "0",
                            endlessJob(dir)}));
  const int port = dashboardPort(agent);
  agent.waitForLine("waiting for 2 node(s) to join", 60s, /*fromStderr=*/true);
  auto data = nlohmann::json::parse(httpGet(port, "/dashboard/data.json").body);
  CHECK(data["round"] == -1);  // the JSON keeps the raw value; the page reads it
  CHECK(data["workers_running"] == 0);

  if (::access(kChromium, X_OK) != 0) {
    MESSAGE("chromium not installed (Debian package chromium): the browser check was skipped");
  } else {
    const std::string url = fmt::format("http://127.0.0.1:{}/dashboard", port);
    auto dom = run(chromium(dir + "/profile", {"--virtual-time-budget=3000", "--dump-dom", url}), {.timeout = 180s});
    INFO(dom.err);
    REQUIRE(dom.exitCode == 0);
    INFO(dom.out);
    CHECK(dom.out.find("agent in no round yet)</h1>") != std::string::npos);
    CHECK(dom.out.find("<td class=\"waiting\">none yet: waiting in the rendezvous (for the round to close, or as a "
                       "spare for a later round)</td>") != std::string::npos);
    CHECK(dom.out.find("<td>-1</td>") == std::string::npos);
    CHECK(dom.out.find(", node 0)") == std::string::npos);
  }

  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}

namespace {

// The text of the cell data-field="field" in the dumped DOM's row id="server-N" (or "" when absent).
std::string serverCell(const std::string& dom, int server, const std::string& field) {
  std::smatch row;
  if (!std::regex_search(dom, row, std::regex(fmt::format(R"re(<tr id="server-{}">(.*?)</tr>)re", server))))
    return "";
  const std::string cells = row[1];
  std::smatch m;
  if (!std::regex_search(cells, m, std::regex(fmt::format(R"re(<td[^>]*data-field="{}"[^>]*>([^<]*)</td>)re", field))))
    return "";
  return m[1];
}

}  // namespace

TEST_CASE("dtrain run --dashboard on a parameter-server job: the page's server section shows the running servers' "
          "requests, updates, bytes, workers and staleness") {
  std::string dir = tempDir("dashboard-ps");
  std::string id = uniqueRunId("dashboard-ps");
  KillByRunId cleanup{id};
  // 4 ranks: workers 0-1, ranks 2-3 serve (servers 0 and 1). 385 parameters: a partition on each server.
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "-n", "4", "--dashboard", "0", "--shutdown-timeout", "2s",
                            endlessJob(dir, R"({"strategy": "parameter_server", "servers": 2, "mode": "async"})",
                                       R"([{"type": "linear", "out": 32}, {"type": "tanh"},
                                           {"type": "linear", "out": 1}])")}));
  const int port = dashboardPort(agent);

  // Both servers answered pushes (with staleness figures) over at least two samples.
  nlohmann::json data;
  auto ready = [&] {
    try {
      auto r = httpGet(port, "/dashboard/data.json", 5s);
      if (r.status != 200) return false;
      data = nlohmann::json::parse(r.body);
      if (data["servers"].size() != 2 || data["ranks"].size() != 2) return false;
      for (const auto& s : data["servers"])
        if (s["updates"].get<uint64_t>() == 0 || s["staleness"]["count"].get<uint64_t>() == 0 ||
            s["history"]["time"].size() < 2 || s["updates_per_second"].is_null())
          return false;
      return true;
    } catch (const std::exception&) {
      return false;
    }
  };
  bool ok = false;
  for (auto end = std::chrono::steady_clock::now() + 90s; !ok && std::chrono::steady_clock::now() < end;) {
    ok = ready();
    if (!ok) std::this_thread::sleep_for(200ms);
  }
  REQUIRE_MESSAGE(ok, data.dump());
  INFO(data.dump());
  std::set<int> serverIndices, serverRanks;
  for (const auto& s : data["servers"]) {
    serverIndices.insert(s["server"].get<int>());
    serverRanks.insert(s["rank"].get<int>());
    CHECK(s["requests_by_op"]["push"].get<uint64_t>() > 0);
    CHECK(s["requests_by_op"]["hello"] == 2);  // one per worker
    CHECK(s["received_bytes"].get<uint64_t>() > 0);
    CHECK(s["sent_bytes"].get<uint64_t>() > 0);
    CHECK(s["errors"] == 0);
    CHECK(s["workers"] == 2);
    CHECK(s["workers_live"] == 2);
    CHECK(s["workers_lost"] == 0);
    CHECK(s["staleness"]["mean"].get<double>() >= 0);
    CHECK(s["staleness"]["p90"].get<double>() >= 0);
    CHECK(s["staleness"]["max"].get<int64_t>() >= 0);
    CHECK(s["history"]["requests_per_second"].size() == s["history"]["time"].size());
  }
  CHECK(serverIndices == std::set<int>{0, 1});
  CHECK(serverRanks == std::set<int>{2, 3});
  for (const auto& r : data["ranks"]) CHECK(r["rank"].get<int>() < 2);  // the servers are not training ranks

  if (::access(dtrain::launch::kChartJsPath, R_OK) != 0 || ::access(kChromium, X_OK) != 0) {
    MESSAGE("chromium or libjs-chart.js not installed (Debian packages chromium, libjs-chart.js): the browser check "
            "was skipped");
  } else {
    const std::string url = fmt::format("http://127.0.0.1:{}/dashboard", port);
    auto dom = run(chromium(dir + "/profile", {"--virtual-time-budget=5000", "--dump-dom", url}), {.timeout = 180s});
    INFO(dom.err);
    REQUIRE(dom.exitCode == 0);
    INFO(dom.out);
    CHECK(dom.out.find(R"(<div id="ps">)") != std::string::npos);  // shown (hidden without servers)
    for (int server : {0, 1}) {
      CAPTURE(server);
      CHECK(serverCell(dom.out, server, "rank") == std::to_string(2 + server));
      std::smatch push;
      const std::string ops = serverCell(dom.out, server, "ops");
      REQUIRE_MESSAGE(std::regex_search(ops, push, std::regex(R"(push: (\d+) \((\d+|-)\))")), ops);
      CHECK(std::stoll(push[1]) > 0);
      CHECK(ops.find("hello: 2") != std::string::npos);
      CHECK(std::stoll(serverCell(dom.out, server, "updates")) > 0);
      CHECK(std::stod(serverCell(dom.out, server, "received_mb")) >= 0);
      CHECK(serverCell(dom.out, server, "errors") == "0");
      CHECK(serverCell(dom.out, server, "workers_live") == "2 of 2");
      CHECK(serverCell(dom.out, server, "workers_lost") == "0");
      CHECK(std::regex_match(serverCell(dom.out, server, "staleness_mean"), std::regex(R"(\d+\.\d\d)")));
      CHECK(std::regex_match(serverCell(dom.out, server, "staleness_p90"), std::regex(R"(\d+\.\d)")));
      CHECK(std::regex_match(serverCell(dom.out, server, "staleness_max"), std::regex(R"(\d+)")));
    }
    std::smatch points;
    REQUIRE(std::regex_search(dom.out, points, std::regex(R"re(id="rendered" data-points="(\d+)")re")));
    // loss and samples/s of 2 ranks, requests/s and staleness of 2 servers: at least 2 points each
    CHECK(std::stoi(points[1]) >= 16);
  }

  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 128 + SIGTERM);
  CHECK(processesWithRunId(id).empty());
}
