// `dtrain run --dashboard PORT` end to end: a real 2-rank job serves the page, Chart.js (Debian's libjs-chart.js)
// and the JSON it polls; a real headless browser (Debian's chromium) loads the page against the running job and
// the charts lay out the points that arrived (the page counts them into #rendered), and a screenshot is taken.
// The browser part skips with a message where chromium is not installed (scripts/setup installs it).
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <regex>
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

std::string endlessJob(const std::string& dir) {
  writeFile(dir + "/job.json", R"({
    "name": "watched",
    "output_dir": ")" + dir + R"(/out",
    "model": {"input": [10], "layers": [{"type": "linear", "out": 1}]},
    "loss": {"type": "mse"},
    "data": {"train": {"format": "synthetic", "task": "regression", "samples": 1024, "features": 10,
                       "outputs": 1, "noise": 0.01, "seed": 7},
             "batch_size": 32},
    "optimizer": {"type": "sgd", "lr": 0.01},
    "train": {"epochs": 100000, "seed": 0},
    "checkpoint": false
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

}  // namespace

TEST_CASE("dtrain run --dashboard: a live page whose charts a headless browser draws from the running job") {
  std::string dir = tempDir("dashboard");
  std::string id = uniqueRunId("dashboard");
  KillByRunId cleanup{id};
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "-n", "2", "--dashboard", "0", endlessJob(dir)}));
  std::smatch m;
  const std::string line = agent.waitForLine("serving the dashboard on", 60s, /*fromStderr=*/true);
  REQUIRE(std::regex_search(line, m, std::regex(R"(http://[^:\s]+:(\d+)/dashboard)")));
  const int port = std::stoi(m[1]);

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
