// `dtrain store` and `dtrain bench store` as a user runs them: real processes, stdout lines, exit codes.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"
#include "rendezvous/tcp_store_client.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

// "dtrain store listening on 127.0.0.1:41234" -> 41234
int portFromLine(const std::string& line) {
  auto colon = line.rfind(':');
  REQUIRE(colon != std::string::npos);
  return std::stoi(line.substr(colon + 1));
}

// utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15).
double cpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  REQUIRE(close != std::string::npos);
  std::istringstream fields(stat.substr(close + 2));
  std::string f;
  long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> f; ++i) {
    if (i == 14) utime = std::stoll(f);
    if (i == 15) stime = std::stoll(f);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

}  // namespace

TEST_CASE("dtrain store: port 0, serves clients, second instance on the port exits 5, SIGTERM exits 0") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0"});
  auto line = store.waitForLine("dtrain store listening on", 20s);
  CHECK(line.rfind("dtrain store listening on 127.0.0.1:", 0) == 0);
  int port = portFromLine(line);
  REQUIRE(port > 0);

  auto client = rendezvous::connectStore("127.0.0.1:" + std::to_string(port), 10s);
  client->set("k", "v");
  CHECK(client->get("k", 5s) == "v");
  CHECK(client->add("n", 3) == 3);

  auto second = run({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", std::to_string(port)},
                    RunOptions{.timeout = 20s});
  CHECK(second.exitCode == static_cast<int>(ExitCode::kAddressInUse));
  CHECK(second.out.empty());
  CHECK(second.err.find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK(second.err.find("Address already in use") != std::string::npos);
  // One clear line, no more.
  CHECK(std::count(second.err.begin(), second.err.end(), '\n') == 1);

  store.signal(SIGTERM);
  auto result = store.wait(20s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 0);
  // stdout held exactly the one listening line.
  CHECK(result.out == line + "\n");
  // The connected client now sees the store gone, not a hang.
  CHECK_THROWS_AS(client->set("k", "again"), NetworkError);
}

TEST_CASE("dtrain store: SIGINT stops it too, --quiet keeps the listening line") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--quiet"});
  auto line = store.waitForLine("dtrain store listening on", 20s);
  store.signal(SIGINT);
  auto result = store.wait(20s);
  CHECK(result.exitCode == 0);
  CHECK(result.err.empty());  // quiet: no info lines
}

TEST_CASE("dtrain store: a bad port is a usage error") {
  auto r = run({dtrainBinary(), "store", "--port", "70000"}, RunOptions{.timeout = 20s});
  CHECK(r.exitCode == static_cast<int>(ExitCode::kUsage));
}

TEST_CASE("dtrain store: limit flags are checked before it starts") {
  auto r = run({dtrainBinary(), "store", "--port", "0", "--max-buffered", "1MiB"}, RunOptions{.timeout = 20s});
  CHECK(r.exitCode == static_cast<int>(ExitCode::kUsage));
  CHECK(r.err.find("--max-buffered 1MiB: must be at least") != std::string::npos);
  r = run({dtrainBinary(), "store", "--port", "0", "--handshake-timeout", "soon"}, RunOptions{.timeout = 20s});
  CHECK(r.exitCode == static_cast<int>(ExitCode::kUsage));
  CHECK(r.err.find("--handshake-timeout soon") != std::string::npos);
  // A count of 0 says what is expected (CLI11's PositiveNumber said "not in range 0.000000 to 1797...").
  for (const char* flag : {"--max-connections", "--max-keys", "--max-keys-per-request"}) {
    r = run({dtrainBinary(), "store", "--port", "0", "--host", "127.0.0.1", flag, "0"}, RunOptions{.timeout = 20s});
    CHECK(r.exitCode == static_cast<int>(ExitCode::kUsage));
    CHECK_MESSAGE(r.err.find(std::string(flag) + ": expected an integer >= 1, got 0") != std::string::npos, r.err);
  }
}

TEST_CASE("dtrain store: quota flags reach the server") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--quiet", "--max-keys", "1"});
  int port = portFromLine(store.waitForLine("dtrain store listening on", 20s));
  auto client = rendezvous::connectStore("127.0.0.1:" + std::to_string(port), 10s);
  client->set("a", "1");
  CHECK_THROWS_WITH_AS(client->set("b", "2"), doctest::Contains("max-keys"), Error);
}

TEST_CASE("dtrain store: where it listens: every interface only with a token or when asked, and it says so") {
  const RunOptions noToken{.timeout = 20s, .unsetEnv = {"DTRAIN_RDZV_TOKEN"}};
  // No --host and no token: refused before it listens (it used to serve 0.0.0.0 unauthenticated).
  auto r = run({dtrainBinary(), "store", "--port", "0"}, noToken);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == static_cast<int>(ExitCode::kUsage));
  CHECK(r.out.empty());
  CHECK(r.err.find("no --rdzv-token") != std::string::npos);
  CHECK(r.err.find("--host 127.0.0.1") != std::string::npos);
  CHECK(r.err.find("--host 0.0.0.0") != std::string::npos);

  {  // A token and no --host: every interface, authenticated, and the start says both.
    Background store({dtrainBinary(), "store", "--port", "0", "--rdzv-token", "t0k"}, noToken);
    auto line = store.waitForLine("dtrain store listening on", 20s);
    CHECK(line.rfind("dtrain store listening on 0.0.0.0:", 0) == 0);
    auto said = store.waitForLine("store: listening on", 20s, true);
    CHECK(said.find("every interface") != std::string::npos);
    CHECK(said.find("authentication on") != std::string::npos);
    rendezvous::TcpStoreClientOptions o;
    o.port = static_cast<uint16_t>(portFromLine(line));
    o.token = "t0k";
    auto client = rendezvous::TcpStoreClient::connect(o);
    client->set("k", "v");
    CHECK(client->get("k", 5s) == "v");
    store.signal(SIGTERM);
    CHECK(store.wait(20s).exitCode == 0);
  }
  {  // Explicitly every interface without a token: served, with a warning that --quiet does not hide.
    Background store({dtrainBinary(), "store", "--host", "0.0.0.0", "--port", "0", "--quiet"}, noToken);
    auto said = store.waitForLine("store: listening on", 20s, true);
    CHECK(said.find("WITHOUT authentication") != std::string::npos);
    CHECK(said.find("every interface") != std::string::npos);
    store.signal(SIGTERM);
    CHECK(store.wait(20s).exitCode == 0);
  }
  {  // Loopback without a token: fine, and said (info).
    Background store({dtrainBinary(), "store", "--rdzv-bind", "127.0.0.1", "--port", "0"}, noToken);
    auto said = store.waitForLine("store: listening on", 20s, true);
    CHECK(said.find("127.0.0.1:") != std::string::npos);
    CHECK(said.find("loopback only") != std::string::npos);
    CHECK(said.find("authentication off") != std::string::npos);
    store.signal(SIGTERM);
    CHECK(store.wait(20s).exitCode == 0);
  }
}

TEST_CASE("dtrain store --rdzv-token: dtrain run needs the same token, else exit 4 naming --rdzv-token") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--quiet", "--rdzv-token", "t0k"});
  int port = portFromLine(store.waitForLine("dtrain store listening on", 20s));
  std::vector<std::string> runArgs = {dtrainBinary(), "run", "--rdzv-backend", "store", "--rdzv-endpoint",
                                      "127.0.0.1:" + std::to_string(port), "--rdzv-timeout", "20s"};
  auto withArgs = [&](std::vector<std::string> extra) {
    auto argv = runArgs;
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.insert(argv.end(), {"--", "/bin/true"});
    return run(argv, RunOptions{.timeout = 60s});
  };
  auto none = withArgs({});
  CHECK(none.exitCode == static_cast<int>(ExitCode::kRendezvous));
  CHECK(none.err.find("requires a rendezvous token and none was given") != std::string::npos);
  CHECK(none.err.find("--rdzv-token") != std::string::npos);
  auto wrong = withArgs({"--rdzv-token", "nope", "--rdzv-id", "wrong"});
  CHECK(wrong.exitCode == static_cast<int>(ExitCode::kRendezvous));
  CHECK(wrong.err.find("refused the rendezvous token: --rdzv-token") != std::string::npos);
  auto tokenFile = std::filesystem::temp_directory_path() / fmt::format("dtrain-token-{}", ::getpid());
  { std::ofstream(tokenFile) << "t0k\n"; }
  auto right = withArgs({"--rdzv-token-file", tokenFile.string(), "--rdzv-id", "right"});
  std::filesystem::remove(tokenFile);
  CHECK(right.exitCode == 0);
  auto both = withArgs({"--rdzv-token", "t0k", "--rdzv-token-file", "/nonexistent"});
  CHECK(both.exitCode == static_cast<int>(ExitCode::kUsage));
  // A folder given as the token file is named as one (was: "the first line is empty").
  auto folder = run({dtrainBinary(), "run", "--standalone", "--rdzv-token-file", "/tmp", "--", "true"},
                    RunOptions{.timeout = 20s});
  CHECK(folder.exitCode == static_cast<int>(ExitCode::kUsage));
  CHECK_MESSAGE(folder.err.find("--rdzv-token-file /tmp: is a folder (expected a file whose first line is the token)") !=
                    std::string::npos,
                folder.err);
  // A file that is not there says why (was: "cannot read it", no reason, nothing of what was expected).
  auto missing = run({dtrainBinary(), "run", "--standalone", "--rdzv-token-file", "/nonexistent-token", "--", "true"},
                     RunOptions{.timeout = 20s});
  CHECK(missing.exitCode == static_cast<int>(ExitCode::kUsage));
  CHECK_MESSAGE(missing.err.find("--rdzv-token-file /nonexistent-token: cannot read it: No such file or directory "
                                 "(expected a readable file whose first line is the token)") != std::string::npos,
                missing.err);
}

TEST_CASE("dtrain run --standalone: the store gets a generated token that only the workers learn") {
  // Each worker connects to the store with the token it inherited; a client without it is refused.
  auto script = fmt::format(
      "test ${{#DTRAIN_RDZV_TOKEN}} -ge 32 && {0} bench store --store $DTRAIN_STORE --clients 1 --seconds 1 "
      ">/dev/null && ! DTRAIN_RDZV_TOKEN= {0} bench store --store $DTRAIN_STORE --clients 1 --seconds 1",
      dtrainBinary());
  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc", "2", "--", "/bin/sh", "-c", script},
               RunOptions{.timeout = 60s});
  CHECK(r.exitCode == 0);
  CHECK(r.err.find("requires a rendezvous token") != std::string::npos);
}

TEST_CASE("dtrain run: the store it hosts listens on the endpoint's address, not on every interface") {
  auto dry = run({dtrainBinary(), "run", "--dry-run", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                  "127.0.0.2:29999", "--", "/bin/true"},
                 RunOptions{.timeout = 20s});
  CHECK(dry.exitCode == 0);
  CHECK(dry.out.find("store: this agent hosts it, listening on 127.0.0.2") != std::string::npos);
  auto bound = run({dtrainBinary(), "run", "--dry-run", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                    "127.0.0.2:29999", "--rdzv-bind", "0.0.0.0", "--", "/bin/true"},
                   RunOptions{.timeout = 20s});
  CHECK(bound.out.find("listening on 0.0.0.0") != std::string::npos);

  // 127.0.0.2 is a loopback address on Linux (127/8): the store must answer there and nowhere else.
  auto port = std::to_string(net::pickFreePort("127.0.0.2"));
  auto script = fmt::format(
      "{0} bench store --store $DTRAIN_STORE --clients 1 --seconds 1 >/dev/null || exit 10; "
      "{0} bench store --store 127.0.0.1:{1} --clients 1 --seconds 1 --connect-timeout 1s; test $? -eq 4",
      dtrainBinary(), port);
  auto r = run({dtrainBinary(), "run", "--rdzv-endpoint", "127.0.0.2:" + port, "--", "/bin/sh", "-c", script},
               RunOptions{.timeout = 60s});
  CHECK(r.exitCode == 0);
  CHECK(r.err.find("cannot connect to the store at 127.0.0.1:" + port) != std::string::npos);
}

TEST_CASE("dtrain run: a different job on a run id already used on the store exits 4 naming both jobs") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--quiet"});
  int port = portFromLine(store.waitForLine("dtrain store listening on", 20s));
  std::vector<std::string> base = {dtrainBinary(), "run", "--rdzv-backend", "store", "--rdzv-endpoint",
                                   "127.0.0.1:" + std::to_string(port), "--rdzv-timeout", "20s", "--"};
  auto first = base;
  first.push_back("/bin/true");
  CHECK(run(first, RunOptions{.timeout = 60s}).exitCode == 0);
  auto other = base;
  other.insert(other.end(), {"/bin/echo", "another", "job"});
  auto r = run(other, RunOptions{.timeout = 60s});
  CHECK(r.exitCode == static_cast<int>(ExitCode::kRendezvous));
  CHECK(r.err.find("another job already uses this run id") != std::string::npos);
  CHECK(r.err.find("`true`") != std::string::npos);
  CHECK(r.err.find("`echo another job`") != std::string::npos);
  CHECK(r.err.find("--rdzv-id") != std::string::npos);
}

TEST_CASE("dtrain bench store prints throughput against a standalone store") {
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "0", "--quiet"});
  int port = portFromLine(store.waitForLine("dtrain store listening on", 20s));
  auto r = run({dtrainBinary(), "bench", "store", "--store", "127.0.0.1:" + std::to_string(port), "--clients",
                "4", "--seconds", "0.2"},
               RunOptions{.timeout = 60s});
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("4 clients") != std::string::npos);
  CHECK(r.out.find("\nset ") != std::string::npos);
  CHECK(r.out.find("\nget ") != std::string::npos);
  CHECK(r.out.find("\ntotal ") != std::string::npos);
  // The bench removed its keys from the shared store.
  auto client = rendezvous::connectStore("127.0.0.1:" + std::to_string(port), 10s);
  CHECK(client->numKeys() == 0);
}

TEST_CASE("dtrain bench store: an unreachable store is a rendezvous error naming it") {
  auto r = run({dtrainBinary(), "bench", "store", "--store", "127.0.0.1:1", "--clients", "1", "--seconds", "0.1",
                "--connect-timeout", "300ms"},
               RunOptions{.timeout = 60s});
  CHECK(r.exitCode == static_cast<int>(ExitCode::kRendezvous));
  CHECK(r.err.find("127.0.0.1:1") != std::string::npos);
}

TEST_CASE("dtrain store at its descriptor limit: keeps descriptors for itself, never spins, serves again") {
  // 64 descriptors (soft and hard, so the store cannot raise them), flooded by idle connections that never
  // send the handshake. Before: the flood took every descriptor, the metrics endpoint's accept then failed with
  // EMFILE and was re-armed at once (a core at 100%, /metrics unanswered). Now the store holds at most
  // 64 - 16 connections, refuses the rest at once, and the process keeps descriptors for everything else.
  const int kFlood = 90;
  Background store({"/bin/sh", "-c",
                    "ulimit -n 64 && exec \"$0\" store --host 127.0.0.1 --port 0 --handshake-timeout 6s "
                    "--metrics-port 0",
                    dtrainBinary()});
  const int port = portFromLine(store.waitForLine("dtrain store listening on", 20s));
  auto metricsLine = store.waitForLine("serving Prometheus metrics on http://127.0.0.1:", 20s, true);
  const int metricsPort = std::stoi(metricsLine.substr(metricsLine.rfind(':') + 1));
  const net::HostPort where{"127.0.0.1", static_cast<uint16_t>(port)};
  std::vector<net::Socket> idle;
  for (int i = 0; i < kFlood; ++i) idle.push_back(net::connect(where, Deadline(10s)));  // the backlog takes the rest
  auto full = store.waitForLine("refusing connections", 20s, true);
  CHECK(full.find("open-file limit 64") != std::string::npos);

  // While flooded: the metrics endpoint answers, and nothing spins on a readable listening socket (a busy loop
  // gets at least a fair share of a core however loaded the machine is; backing off costs next to nothing).
  const double before = cpuSeconds(store.pid());
  net::Socket scrape = net::connect({"127.0.0.1", static_cast<uint16_t>(metricsPort)}, Deadline(10s));
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  REQUIRE(net::sendAll(scrape.fd(), get.data(), get.size()));
  char head[12] = {};
  CHECK(net::recvAll(scrape.fd(), head, sizeof(head), Deadline(3s)));
  CHECK(std::string(head, sizeof(head)) == "HTTP/1.1 200");
  std::this_thread::sleep_for(2s);  // measuring CPU over a duration, not waiting for an event
  const double used = cpuSeconds(store.pid()) - before;
  CHECK_MESSAGE(used < 0.3, "the store used ", used, " s of CPU in 2 s while flooded");

  // The held idle connections are closed by the handshake timeout (the client sees EOF), then a real client is
  // served.
  for (auto& s : idle) {
    char b;
    net::recvAll(s.fd(), &b, 1, Deadline(20s));
  }
  idle.clear();
  rendezvous::TcpStoreClientOptions o;
  o.port = static_cast<uint16_t>(port);
  o.connectTimeout = 30s;
  auto client = rendezvous::TcpStoreClient::connect(o);
  client->set("k", "v");
  CHECK(client->get("k", 5s) == "v");
  CHECK(client->add("n", 2) == 2);
  store.signal(SIGTERM);
  auto result = store.wait(20s);
  CHECK_FALSE(result.timedOut);
  CHECK(result.exitCode == 0);
  CHECK(result.err.find("cannot accept") == std::string::npos);  // never ran out of descriptors
}
