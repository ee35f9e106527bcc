// `dtrain run` against stores that misbehave: a store that answers the handshake and then nothing, something
// that is not a dtrain store, a store whose host is frozen. The agent must end in bounded time with the
// README's exit code, and keep honouring signals meanwhile.
#include <doctest/doctest.h>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "lib/common/socket.h"
#include "rendezvous/store_protocol.h"
#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
namespace proto = dtrain::rendezvous::proto;

namespace {

// A TCP server on 127.0.0.1 that answers each connection's first bytes with `greeting` (built from what the
// client sent) and then reads and ignores everything, never replying. Stops (closing everything) on destruction.
class FakeStore {
 public:
  explicit FakeStore(std::function<std::string(const std::string&)> greeting) : greeting_(std::move(greeting)) {
    auto listener = dtrain::net::listen("127.0.0.1", 0);
    fd_ = listener.socket.release();
    port_ = listener.port;
    thread_ = std::thread([this] { loop(); });
  }
  ~FakeStore() {
    stop_ = true;
    thread_.join();
    for (int c : clients_) ::close(c);
    ::close(fd_);
  }
  int port() const { return port_; }

 private:
  void loop() {
    std::vector<std::string> got;
    while (!stop_) {
      std::vector<pollfd> fds{{fd_, POLLIN, 0}};
      for (int c : clients_) fds.push_back({c, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), 100) <= 0) continue;
      if (fds[0].revents & POLLIN) {
        int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) clients_.push_back(c), got.emplace_back(), answered_.push_back(false);
      }
      for (size_t i = 1; i < fds.size(); ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP))) continue;
        char buf[4096];
        ssize_t n = ::recv(fds[i].fd, buf, sizeof(buf), 0);
        if (n <= 0) continue;
        if (answered_[i - 1]) continue;  // requests are read and never answered
        got[i - 1].append(buf, static_cast<size_t>(n));
        std::string reply = greeting_(got[i - 1]);
        if (!reply.empty()) {
          ::send(fds[i].fd, reply.data(), reply.size(), MSG_NOSIGNAL);
          answered_[i - 1] = true;
        }
      }
    }
  }
  std::function<std::string(const std::string&)> greeting_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::vector<int> clients_;
  std::vector<bool> answered_;
  std::thread thread_;
};

// The handshake reply of a healthy store (store_protocol.h): magic, version, status ok.
std::string storeHandshakeReply(const std::string& hello) {
  std::string request;
  proto::putHandshake(request);
  if (hello.size() < request.size()) return "";
  std::string reply(proto::kMagic);
  uint16_t version = proto::kVersion;
  reply.append(reinterpret_cast<const char*>(&version), sizeof(version));
  reply.push_back(0);  // HandshakeStatus::kOk
  return reply;
}

}  // namespace

TEST_CASE("a store that completes the handshake and never answers ends the run with exit 4 in bounded time") {
  FakeStore mute(storeHandshakeReply);
  auto start = std::chrono::steady_clock::now();
  auto r = run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", mute.port()),
                        "--rdzv-id", uniqueRunId("mute"), "--rdzv-timeout", "5s", "--", "true"}),
               {.timeout = 40s});
  auto took = std::chrono::steady_clock::now() - start;
  INFO(r.err);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 4);
  CHECK(took < 20s);
  CHECK(r.err.find(fmt::format("lost the rendezvous store at 127.0.0.1:{}", mute.port())) != std::string::npos);
}

TEST_CASE("something that is not a dtrain store at the endpoint gives exit 6") {
  FakeStore http([](const std::string&) { return std::string("HTTP/1.1 400 Bad Request\r\n\r\n"); });
  auto r = run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", http.port()),
                        "--rdzv-timeout", "5s", "--", "true"}),
               {.timeout = 40s});
  INFO(r.err);
  CHECK(r.exitCode == 6);
  CHECK(r.err.find("is not a dtrain store") != std::string::npos);
}

TEST_CASE("a frozen store host: the other node stops within a few heartbeat timeouts, and honours SIGTERM") {
  int port = freePort();
  std::string id = uniqueRunId("frozen");
  auto args = [&](int nodeRank) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--heartbeat-timeout",
                    "3s", "--shutdown-timeout", "3s", "--", "sh", "-c", "echo started $$; exec sleep 1000"});
  };
  Background node0(args(0));
  Background node1(args(1));
  std::string started = node1.waitForLine("[n1 r1] started", 60s);
  REQUIRE(started.find("started ") != std::string::npos);
  pid_t worker1 = static_cast<pid_t>(std::stol(started.substr(started.find("started ") + 8)));
  node0.waitForLine("[n0 r0] started", 60s);
  node0.signal(SIGSTOP);  // the store's host freezes; its worker keeps running
  RunResult r1;
  auto start = std::chrono::steady_clock::now();
  SUBCASE("on its own") {
    r1 = node1.wait(30s);
    CHECK(r1.exitCode == 4);
    CHECK(r1.err.find("lost the rendezvous store") != std::string::npos);
    CHECK(r1.err.find("restarting the workers") == std::string::npos);
  }
  SUBCASE("SIGTERM") {
    node1.signal(SIGTERM);
    // Supervision does not wait for the store: the worker is stopped at once...
    CHECK(waitForExit(worker1, 5s));
    // ...and the agent exits once the store calls already under way reach their deadline.
    r1 = node1.wait(30s);
    CHECK(r1.exitCode == 128 + SIGTERM);
  }
  INFO(r1.err);
  CHECK(std::chrono::steady_clock::now() - start < 25s);
  node0.signal(SIGKILL);  // its worker follows through PDEATHSIG
  node0.wait(30s);
  for (int i = 0; i < 100 && !processesWithRunId(id).empty(); ++i) std::this_thread::sleep_for(100ms);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("a console nobody reads never blocks the agent: SIGTERM is honoured and the log file gets everything") {
  std::string dir = tempDir("console");
  std::string id = uniqueRunId("console");
  // 24 MB of stdout (more than the agent queues for its console), then the agent's pid on stderr.
  writeFile(dir + "/worker.sh",
            "head -c 24000000 /dev/zero | tr '\\0' x | fold -w 99\necho \"agent=$PPID\" >&2\nexec sleep 1000\n");
  // `sleep` holds the read end of the agent's stdout and never reads it.
  Background bg({"sh", "-c",
                 fmt::format("'{}' run --standalone --nproc-per-node 1 --rdzv-id {} --log-dir {}/logs -- sh {}/worker.sh "
                             "| sleep 1000",
                             dtrainBinary(), id, dir, dir)});
  std::string line = bg.waitForLine("agent=", 60s, /*fromStderr=*/true);
  REQUIRE(line.find("agent=") != std::string::npos);
  pid_t agent = static_cast<pid_t>(std::stol(line.substr(line.find("agent=") + 6)));
  ::kill(agent, SIGTERM);
  CHECK(waitForExit(agent, 15s));
  bg.signalGroup(SIGKILL);
  bg.wait(30s);
  auto logged = readFile(fmt::format("{}/logs/{}/attempt_0/0/stdout.log", dir, id));
  CHECK(logged.size() == 24000000 + 24000000 / 99);  // fold ends the last, partial line without a newline
  for (int i = 0; i < 100 && !processesWithRunId(id).empty(); ++i) std::this_thread::sleep_for(100ms);
  CHECK(processesWithRunId(id).empty());
}
