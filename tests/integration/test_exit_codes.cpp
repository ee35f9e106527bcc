// The README's exit-code table, enforced: every row of it is read from README.md and must have a scenario here
// that makes `dtrain run` (or `dtrain check`, for the job file) exit with that code, and every scenario must be a
// row of the table. A new row without a test, or a test for a code the README does not document, fails.
// The scenarios are the quickest way to each code; the behaviour behind each has its own detailed tests.
#include <doctest/doctest.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "lib/common/socket.h"
#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

// The first cells of the rows of README.md's "### Exit codes" table: "0", "1", ..., "126 / 127", "128+N", "other".
std::vector<std::string> readmeExitCodes() {
  std::istringstream in(readFile(sourceDir() + "/README.md"));
  std::vector<std::string> codes;
  std::string line;
  bool inSection = false;
  while (std::getline(in, line)) {
    if (line.rfind("#", 0) == 0) inSection = line == "### Exit codes";
    if (!inSection || line.rfind("| ", 0) != 0) continue;
    std::string cell = line.substr(2, line.find(" |", 2) - 2);
    if (cell == "code" || cell.rfind("---", 0) == 0) continue;
    codes.push_back(cell);
  }
  return codes;
}

// A server on 127.0.0.1 that answers every connection like a web server would, whatever it is sent.
class NotAStore {
 public:
  NotAStore() {
    auto listener = dtrain::net::listen("127.0.0.1", 0);
    fd_ = listener.socket.release();
    port_ = listener.port;
    thread_ = std::thread([this] {
      while (!stop_) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 100) <= 0) continue;
        int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        const std::string reply = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        ::send(c, reply.data(), reply.size(), MSG_NOSIGNAL);
        clients_.push_back(c);
      }
    });
  }
  ~NotAStore() {
    stop_ = true;
    thread_.join();
    for (int c : clients_) ::close(c);
    ::close(fd_);
  }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::vector<int> clients_;
  std::thread thread_;
};

struct Outcome {
  int exitCode = -1;
  std::string err;
};

Outcome outcome(const RunResult& r) {
  CHECK_FALSE(r.timedOut);
  return {r.exitCode, r.err};
}

std::string jobFile(const std::string& dir, const std::string& name, const json& job) {
  writeFile(dir + "/" + name, job.dump());
  return dir + "/" + name;
}

// For each row: the code(s) expected, what produces them, and a part of the message that says why.
struct Scenario {
  std::vector<int> codes;
  std::function<std::vector<Outcome>(const std::string& dir)> run;
  std::string says;
};

std::map<std::string, Scenario> scenarios() {
  std::map<std::string, Scenario> s;
  s["0"] = {{0}, [](const std::string&) { return std::vector{outcome(run(runArgs({"--standalone", "--", "true"})))}; },
            ""};
  s["1"] = {{1},
            [](const std::string& dir) {
              json job = smallJob();
              return std::vector{outcome(run(runArgs({"--standalone", jobFile(dir, "bug.json", job), "--output-dir",
                                                      dir + "/bug"}),
                                             {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=0,step=1,action=throw"}}}))};
            },
            "internal error: DTRAIN_FAULT: injected bug after step 1"};
  s["2"] = {{2},
            [](const std::string& dir) {
              json job = smallJob();
              job["optimizer"]["lr"] = -1;
              auto file = jobFile(dir, "bad.json", job);
              return std::vector{outcome(run({dtrainBinary(), "check", file})),
                                 outcome(run(runArgs({"--standalone", file})))};
            },
            "/optimizer/lr"};
  s["3"] = {{3}, [](const std::string&) { return std::vector{outcome(run(runArgs({"--no-such-flag", "--", "true"})))}; },
            "--no-such-flag"};
  s["4"] = {{4},
            [](const std::string&) {
              int port = freePort();
              return std::vector{outcome(run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint",
                                                      fmt::format("127.0.0.1:{}", port), "--rdzv-timeout", "1s", "--",
                                                      "true"})))};
            },
            "no rendezvous store answered"};
  s["5"] = {{5},
            [](const std::string&) {
              auto held = dtrain::net::listen("127.0.0.1", 0);
              return std::vector{outcome(run(runArgs({"--rdzv-endpoint", fmt::format("127.0.0.1:{}", held.port),
                                                      "--rdzv-id", "x", "--", "true"})))};
            },
            "cannot host the rendezvous store on port"};
  s["6"] = {{6},
            [](const std::string&) {
              NotAStore http;
              return std::vector{outcome(run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint",
                                                      fmt::format("127.0.0.1:{}", http.port()), "--rdzv-timeout", "5s",
                                                      "--", "true"})))};
            },
            "is not a dtrain store"};
  s["7"] = {{7},
            [](const std::string& dir) {
              // Rank 1 hangs after step 2: rank 0's all-reduce times out after parallel.timeout and it exits 7.
              json job = smallJob();
              job["parallel"] = {{"timeout", 2}};
              return std::vector{outcome(run(runArgs({"--standalone", "--nproc-per-node", "2", "--shutdown-timeout",
                                                      "1s", jobFile(dir, "hang.json", job), "--output-dir",
                                                      dir + "/hang"}),
                                             {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=2,action=hang"}}}))};
            },
            "exit code 7"};
  s["8"] = {{8},
            [](const std::string& dir) {
              // Resuming from a checkpoint of another model.
              json job = smallJob();
              job["train"]["max_steps"] = 3;
              auto file = jobFile(dir, "ckpt.json", job);
              auto first = outcome(run(runArgs({"--standalone", file, "--output-dir", dir + "/ckpt"}), {.timeout = 60s}));
              CHECK(first.exitCode == 0);
              return std::vector{outcome(run(runArgs({"--standalone", file, "--set", "model.layers.0.out=32",
                                                      "--output-dir", dir + "/ckpt"}),
                                             {.timeout = 60s}))};
            },
            "step-000000003"};
  s["9"] = {{9},
            [](const std::string& dir) {
              json job = smallJob();
              job["optimizer"]["lr"] = 1e38;
              return std::vector{outcome(run(runArgs({"--standalone", jobFile(dir, "nan.json", job), "--output-dir",
                                                      dir + "/nan"}),
                                             {.timeout = 60s}))};
            },
            "non-finite"};
  s["126 / 127"] = {{126, 127},
                    [](const std::string& dir) {
                      writeFile(dir + "/script.sh", "echo hi\n");  // not executable
                      return std::vector{outcome(run(runArgs({"--standalone", "--", dir + "/script.sh"}))),
                                         outcome(run(runArgs({"--standalone", "--", "no-such-program-xyz"})))};
                    },
                    ""};
  s["128+N"] = {{128 + SIGKILL},
                [](const std::string&) {
                  return std::vector{outcome(run(runArgs({"--standalone", "--", "sh", "-c", "kill -KILL $$"})))};
                },
                "signal 9"};
  s["other"] = {{42},
                [](const std::string&) {
                  return std::vector{outcome(run(runArgs({"--standalone", "--", "sh", "-c", "exit 42"})))};
                },
                "exit code 42"};
  return s;
}

}  // namespace

TEST_CASE("every row of the README's exit-code table has a scenario that exits with it, and no other code exists") {
  auto documented = readmeExitCodes();
  REQUIRE(documented.size() >= 10);
  auto all = scenarios();
  std::set<std::string> tested;
  for (const auto& [row, _] : all) tested.insert(row);
  CHECK(std::set<std::string>(documented.begin(), documented.end()) == tested);

  std::string dir = tempDir("exit_codes");
  for (const auto& row : documented) {
    CAPTURE(row);
    auto it = all.find(row);
    if (it == all.end()) continue;  // reported by the set comparison above
    auto results = it->second.run(dir);
    for (size_t i = 0; i < results.size(); ++i) {
      INFO(results[i].err);
      int expected = it->second.codes.size() == 1 ? it->second.codes[0] : it->second.codes[i];
      CHECK(results[i].exitCode == expected);
      if (!it->second.says.empty()) CHECK(results[i].err.find(it->second.says) != std::string::npos);
    }
  }
}

namespace {

// The command names a --help lists under "Subcommands:" (CLI11: two spaces, the name, spaces, its description).
std::vector<std::string> subcommandsIn(const std::string& help) {
  std::istringstream in(help);
  std::vector<std::string> names;
  bool inSection = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Subcommands:", 0) == 0) {
      inSection = true;
      continue;
    }
    if (!inSection) continue;
    if (line.rfind("  ", 0) != 0) break;
    std::istringstream words(line);
    std::string name;
    words >> name;
    names.push_back(name);
  }
  return names;
}

// The codes a command's --help lists under "Exit codes" (lines "  CODE      meaning", CODE in a 10-wide column).
std::vector<std::string> exitCodesIn(const std::string& help) {
  std::istringstream in(help);
  std::vector<std::string> codes;
  bool inSection = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Exit codes", 0) == 0) {
      inSection = true;
      continue;
    }
    if (!inSection) continue;
    if (line.rfind("  ", 0) != 0) break;
    std::string code = line.substr(2, 10);
    code.erase(code.find_last_not_of(' ') + 1);
    codes.push_back(code);
  }
  return codes;
}

}  // namespace

TEST_CASE("every command's --help lists the exit codes it can return, each a row of the README's table") {
  // `dtrain top --help` said nothing of its exit code 10 (the job is not running), nor did any command of its codes.
  const auto documented = readmeExitCodes();
  const std::set<std::string> table(documented.begin(), documented.end());
  std::vector<std::vector<std::string>> commands;
  auto root = run({dtrainBinary(), "--help"});
  REQUIRE(root.exitCode == 0);
  for (const auto& name : subcommandsIn(root.out)) {
    auto help = run({dtrainBinary(), name, "--help"});
    auto nested = subcommandsIn(help.out);
    if (nested.empty()) commands.push_back({name});
    for (const auto& sub : nested) commands.push_back({name, sub});
  }
  REQUIRE(commands.size() >= 15);  // run, train, check, store, top, sim, ..., ckpt list, bench allreduce, debug dump
  std::map<std::string, std::vector<std::string>> listed;
  for (const auto& words : commands) {
    std::vector<std::string> argv{dtrainBinary()};
    argv.insert(argv.end(), words.begin(), words.end());
    argv.push_back("--help");
    auto help = run(argv);
    const std::string command = fmt::format("{}", fmt::join(words, " "));
    CAPTURE(command);
    CHECK(help.exitCode == 0);
    const auto codes = exitCodesIn(help.out);
    listed[command] = codes;
    // Every command can fail inside dtrain (1) and on its command line (3), and returns 0 when it did its work.
    for (const char* always : {"0", "1", "3"})
      CHECK_MESSAGE(std::find(codes.begin(), codes.end(), always) != codes.end(), help.out);
    for (const auto& code : codes) {
      CAPTURE(code);
      // 10 is the one code of `dtrain top` and `dtrain debug dump` beside the table (README says so below it).
      const bool monitor = command == "top" || command == "debug dump";
      CHECK((table.count(code) == 1 || (code == "10" && monitor)));
    }
  }
  using Codes = std::vector<std::string>;
  CHECK(listed["top"] == Codes{"0", "1", "3", "4", "6", "10"});
  CHECK(listed["debug dump"] == Codes{"0", "1", "3", "4", "6", "10"});
  CHECK(listed["run"] == documented);  // dtrain run returns every code of the table
  CHECK(listed["check"] == Codes{"0", "1", "2", "3", "8"});
  CHECK(listed["store"] == Codes{"0", "1", "3", "5"});
}
