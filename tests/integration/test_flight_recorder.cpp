// Hang diagnosis end to end (docs/monitoring.md): a rank frozen mid-run (SIGSTOP) is named by
// `dtrain debug dump RUN_ID` while the others wait in a collective, and again by the agent when the collective
// times out and the round fails.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <regex>
#include <thread>

#include "tests/integration/launch_helpers.h"
#include "tests/support/http_get.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

// Whatever happens, nothing survives the case: a stopped rank is continued and killed.
struct KillRun {
  std::string id;
  ~KillRun() {
    for (pid_t pid : processesWithRunId(id)) {
      ::kill(pid, SIGKILL);
      ::kill(pid, SIGCONT);
    }
  }
};

// dir/job.json: a tiny regression that trains until it is stopped, its output in dir/out.
void writeEndlessJob(const std::string& dir, const std::string& name, const std::string& extra = "") {
  writeFile(dir + "/job.json", R"({
    "name": ")" + name + R"(",
    "output_dir": ")" + dir + R"(/out",
    "model": {"input": [10], "layers": [{"type": "linear", "out": 1}]},
    "loss": {"type": "mse"},
    "data": {"train": {"format": "synthetic", "task": "regression", "samples": 1024, "features": 10, "outputs": 1,
                       "seed": 7}, "batch_size": 32},
    "optimizer": {"type": "sgd", "lr": 0.01},
    "train": {"epochs": 100000, "seed": 0},)" + extra + R"(
    "checkpoint": false
  })");
}

}  // namespace

TEST_CASE("a rank frozen mid-step is named by dtrain debug dump and by the agent when the collective times out") {
  std::string dir = tempDir("flight");
  std::string id = uniqueRunId("flight");
  KillRun cleanup{id};
  writeEndlessJob(dir, "frozen", R"("parallel": {"timeout": "15s"},)");
  const int storePort = freePort();
  const std::string endpoint = fmt::format("127.0.0.1:{}", storePort);
  Background agent(runArgs({"--rdzv-endpoint", endpoint, "--rdzv-id", id, "-n", "2", "--metrics-port", "0",
                            "--shutdown-timeout", "2s", dir + "/job.json"}));
  std::smatch m;
  std::string line = agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true);
  REQUIRE(std::regex_search(line, m, std::regex(R"(:(\d+)/metrics)")));
  const int port = std::stoi(m[1]);

  // Both ranks training: find rank 1's pid in the agent's flight records.
  int rank1 = -1;
  auto until = std::chrono::steady_clock::now() + 60s;
  while (rank1 < 0 && std::chrono::steady_clock::now() < until) {
    auto ranks = nlohmann::json::parse(httpGet(port, "/debug/flight.json").body);
    for (const auto& r : ranks)
      if (r["rank"] == 1 && r["steps_done"].get<int64_t>() > 3) rank1 = r["pid"];
    if (rank1 < 0) std::this_thread::sleep_for(100ms);
  }
  REQUIRE(rank1 > 0);
  // dtrain top shows both ranks of the running job, found through the store.
  auto top = run({dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--once"}, {.timeout = 30s});
  CHECK_MESSAGE(top.exitCode == 0, top.err);
  CHECK(top.out.find(fmt::format("dtrain top: run {} (1 agent(s), 2 rank(s))", id)) != std::string::npos);
  CHECK(top.out.find("round 0, restarts 0, 2 worker(s) running") != std::string::npos);
  CHECK(linesWith(top.out, "     0     0 ").size() == 1);  // rank 0 on node 0
  CHECK(linesWith(top.out, "     1     0 ").size() == 1);
  // A run id that no agent joined on this store is named as such (was: "start `dtrain run` with --metrics-port").
  auto typo = run({dtrainBinary(), "top", id + "x", "--rdzv-endpoint", endpoint, "--once"}, {.timeout = 30s});
  CHECK(typo.exitCode == 4);
  CHECK_MESSAGE(typo.err.find(fmt::format("run {}x at {}: no such run on this store", id, endpoint)) !=
                    std::string::npos,
                typo.err);
  REQUIRE(::kill(rank1, SIGSTOP) == 0);

  // Rank 0 soon waits in a collective rank 1 never begins: dump names rank 1 as behind.
  std::string dump;
  until = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < until) {
    auto r = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", endpoint}, {.timeout = 30s});
    REQUIRE_MESSAGE(r.exitCode == 0, r.err);
    dump = r.out;
    if (dump.find("verdict: rank 1 is behind") != std::string::npos) break;
    std::this_thread::sleep_for(200ms);
  }
  CHECK_MESSAGE(dump.find("verdict: rank 1 is behind: at step ") != std::string::npos, dump);
  CHECK_MESSAGE(dump.find("verdict: rank(s) 0 wait in allreduce #") != std::string::npos, dump);
  // Its two reads, a second apart, saw rank 1 stand still.
  CHECK_MESSAGE((dump.find("no rank moved in the last") != std::string::npos ||
                 dump.find("rank(s) 1 did not") != std::string::npos),
                dump);
  CHECK(dump.find(fmt::format("pid {}", rank1)) != std::string::npos);

  // The collective times out (parallel.timeout 15s): rank 0 fails, the round ends, and the agent prints the same
  // diagnosis with its failure report.
  auto result = agent.wait(90s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode != 0);
  CHECK_MESSAGE(result.err.find("verdict: rank 1 is behind") != std::string::npos, result.err);
  CHECK(processesWithRunId(id).empty());

  // Without --metrics-port there is nothing to gather: a clear error, exit 4.
  auto none = run({dtrainBinary(), "debug", "dump", "no-such-run", "--rdzv-endpoint", "127.0.0.1:1", "--timeout", "1s"});
  CHECK(none.exitCode != 0);
}

TEST_CASE("dtrain debug dump of a healthy running job says it runs: no rank named behind, no transport suspected") {
  // One read of a moving job catches ranks inside collectives, or one a call ahead of another: the verdict used to be
  // "every rank is inside allreduce #186 ... for 0.0 s (suspect the transport ...)" or "rank 1 is behind" for a job
  // that trained at full speed. The dump reads twice, a second apart, and every rank moved in between.
  std::string dir = tempDir("flight-moving");
  std::string id = uniqueRunId("flight-moving");
  KillRun cleanup{id};
  writeEndlessJob(dir, "moving");
  const std::string endpoint = fmt::format("127.0.0.1:{}", freePort());
  Background agent(runArgs({"--rdzv-endpoint", endpoint, "--rdzv-id", id, "-n", "2", "--metrics-port", "0",
                            "--shutdown-timeout", "2s", dir + "/job.json"}));
  agent.waitForLine("serving Prometheus metrics on", 60s, /*fromStderr=*/true);
  agent.waitForLine("[n0 r0] epoch 1/", 60s);  // training: its progress lines are printed
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    auto r = run({dtrainBinary(), "debug", "dump", id, "--rdzv-endpoint", endpoint}, {.timeout = 30s});
    REQUIRE_MESSAGE(r.exitCode == 0, r.err);
    CHECK_MESSAGE(r.out.find("verdict: no hang: every rank moved on in the last ") != std::string::npos, r.out);
    CHECK(r.out.find("is behind") == std::string::npos);
    CHECK(r.out.find("suspect the transport") == std::string::npos);
  }
  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("--standalone names its store and writes its random token to a file that dtrain top reads") {
  // --standalone draws the store's port and token at random: without them `dtrain top` could not reach the job.
  std::string dir = tempDir("standalone");
  writeEndlessJob(dir, "standalone");
  Background agent(runArgs({"--standalone", "-n", "1", "--metrics-port", "0", "--shutdown-timeout", "2s",
                            dir + "/job.json"}),
                   {.env = {{"XDG_RUNTIME_DIR", dir}}});
  const std::string line = agent.waitForLine("standalone store on", 60s, /*fromStderr=*/true);
  std::smatch m;
  REQUIRE_MESSAGE(std::regex_search(line, m,
                                    std::regex(R"(standalone store on (127\.0\.0\.1:\d+), run id ([0-9a-f]+); watch the )"
                                               R"(job with: dtrain top \2 --rdzv-endpoint \1 --rdzv-token-file (\S+))")),
                  line);
  const std::string endpoint = m[1], id = m[2], tokenFile = m[3];
  KillRun cleanup{id};
  CHECK(tokenFile == fmt::format("{}/dtrain-{}.token", dir, id));
  struct stat st {};
  REQUIRE(::stat(tokenFile.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(readFile(tokenFile).size() == 32);
  CHECK(line.find(readFile(tokenFile)) == std::string::npos);  // the secret itself is never logged

  // The command the line gives works (once the worker has registered), and without the token the store refuses.
  RunResult top;
  const auto until = std::chrono::steady_clock::now() + 60s;
  do {
    top = run({dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--rdzv-token-file", tokenFile, "--once"},
              {.timeout = 30s});
    if (top.out.find("(1 agent(s), 1 rank(s))") != std::string::npos) break;  // the worker has reported
    std::this_thread::sleep_for(100ms);
  } while (std::chrono::steady_clock::now() < until);
  CHECK_MESSAGE(top.exitCode == 0, top.err);
  CHECK_MESSAGE(top.out.find(fmt::format("dtrain top: run {} (1 agent(s), 1 rank(s))", id)) != std::string::npos,
                top.out);
  auto refused = run({dtrainBinary(), "top", id, "--rdzv-endpoint", endpoint, "--once"},
                     {.timeout = 30s, .unsetEnv = {"DTRAIN_RDZV_TOKEN"}});
  CHECK(refused.exitCode != 0);
  CHECK_MESSAGE(refused.err.find("token") != std::string::npos, refused.err);

  // The token file goes with the job.
  agent.signal(SIGTERM);
  auto result = agent.wait(60s);
  CHECK_FALSE(result.timedOut);
  CHECK(::stat(tokenFile.c_str(), &st) != 0);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("--standalone without --metrics-port gives no dtrain top command that cannot work, and writes no token file") {
  // dtrain top and debug dump find the agents through the endpoint --metrics-port publishes: without it the
  // command the line used to give failed ("no agent published a monitoring endpoint"), and the token file it
  // pointed to was a secret on disk for nothing.
  std::string dir = tempDir("standalone-nometrics");
  auto r = run(runArgs({"--standalone", "-n", "1", "--", "true"}), {.timeout = 60s, .env = {{"XDG_RUNTIME_DIR", dir}}});
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 0);
  std::smatch m;
  REQUIRE_MESSAGE(std::regex_search(r.err, m, std::regex(R"(standalone store on 127\.0\.0\.1:\d+, run id ([0-9a-f]+))")),
                  r.err);
  const std::string id = m[1];
  CHECK_MESSAGE(r.err.find("watch the job with: dtrain top") == std::string::npos, r.err);
  CHECK_MESSAGE(r.err.find("start the run with --metrics-port 0 to watch it with dtrain top") != std::string::npos,
                r.err);
  struct stat st {};
  CHECK(::stat(fmt::format("{}/dtrain-{}.token", dir, id).c_str(), &st) != 0);
}

TEST_CASE("two --standalone runs given the same --rdzv-id keep their own token files") {
  // The file is named after the run id: the second run used to overwrite the first's token (whose dtrain top
  // command was then refused) and the first, when it ended, removed the second's file.
  std::string dir = tempDir("standalone-twice");
  const std::string id = uniqueRunId("twice");
  KillRun cleanup{id};
  auto start = [&] {
    return std::make_unique<Background>(runArgs({"--standalone", "-n", "1", "--metrics-port", "0", "--rdzv-id", id,
                                                 "--shutdown-timeout", "2s", "--", "sleep", "300"}),
                                        RunOptions{.env = {{"XDG_RUNTIME_DIR", dir}}});
  };
  auto tokenFileOf = [](Background& agent) {
    const std::string line = agent.waitForLine("standalone store on", 60s, /*fromStderr=*/true);
    std::smatch m;
    REQUIRE_MESSAGE(std::regex_search(line, m, std::regex(R"(--rdzv-token-file (\S+))")), line);
    return std::string(m[1]);
  };
  auto first = start();
  const std::string firstFile = tokenFileOf(*first);
  auto second = start();
  const std::string secondFile = tokenFileOf(*second);
  CHECK(firstFile != secondFile);
  CHECK(readFile(firstFile) != readFile(secondFile));
  const std::string secondToken = readFile(secondFile);

  first->signal(SIGTERM);
  CHECK_FALSE(first->wait(60s).timedOut);
  struct stat st {};
  CHECK(::stat(firstFile.c_str(), &st) != 0);
  REQUIRE(::stat(secondFile.c_str(), &st) == 0);
  CHECK(readFile(secondFile) == secondToken);
  second->signal(SIGTERM);
  CHECK_FALSE(second->wait(60s).timedOut);
  CHECK(::stat(secondFile.c_str(), &st) != 0);
}

TEST_CASE("--standalone falls back to /tmp for its token file when $XDG_RUNTIME_DIR cannot take it") {
  // A folder that exists but where nothing can be created (/proc, also for root): the token went nowhere and the
  // logged dtrain top command lacked it, so the store refused it.
  auto r = run(runArgs({"--standalone", "-n", "1", "--metrics-port", "0", "--", "true"}),
               {.timeout = 60s, .env = {{"XDG_RUNTIME_DIR", "/proc"}}});
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 0);
  std::smatch m;
  REQUIRE_MESSAGE(std::regex_search(r.err, m, std::regex(R"(run id ([0-9a-f]+); watch the job with: dtrain top \1 )"
                                                         R"(--rdzv-endpoint \S+ --rdzv-token-file (\S+))")),
                  r.err);
  CHECK(m[2] == fmt::format("/tmp/dtrain-{}.token", std::string(m[1])));
  CHECK_MESSAGE(r.err.find("cannot write") == std::string::npos, r.err);
}

TEST_CASE("--standalone with a --rdzv-token-file logs a dtrain top command with that file") {
  // The line said `--rdzv-token ...`, a placeholder a pasted command sent as the token (refused).
  std::string dir = tempDir("standalone-tokenfile");
  writeFile(dir + "/token", "s3cret\n");
  auto r = run(runArgs({"--standalone", "-n", "1", "--metrics-port", "0", "--rdzv-token-file", dir + "/token", "--",
                        "true"}),
               {.timeout = 60s});
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 0);
  CHECK_MESSAGE(r.err.find(" --rdzv-token-file " + dir + "/token") != std::string::npos, r.err);
  CHECK_MESSAGE(r.err.find("--rdzv-token ...") == std::string::npos, r.err);
}
