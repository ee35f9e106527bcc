// Collectives across real processes: `dtrain bench` workers bootstrapped through a real TCP store, over real
// sockets and real shared memory; a rank killed or stopped mid-collective fails the others in bounded time;
// nothing is left in /dev/shm. Also the documented launch: `dtrain run ... -- dtrain bench allreduce`.
#include <doctest/doctest.h>

#include <dirent.h>
#include <signal.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "rendezvous/tcp_store_server.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

struct Rank {
  int rank, size, localRank, localSize, node;
};

// n ranks spread over `nodes` simulated nodes, contiguous per node (as the launcher assigns them).
std::vector<Rank> layout(int n, int nodes) {
  std::vector<Rank> out;
  const int perNode = (n + nodes - 1) / nodes;
  for (int r = 0; r < n; ++r) {
    const int node = r / perNode;
    const int localSize = std::min(perNode, n - node * perNode);
    out.push_back(Rank{r, n, r - node * perNode, localSize, node});
  }
  return out;
}

RunOptions workerEnv(const Rank& r, const std::string& store, const std::string& runId) {
  RunOptions o;
  o.timeout = 120s;
  o.env = {{"RANK", std::to_string(r.rank)},           {"WORLD_SIZE", std::to_string(r.size)},
           {"LOCAL_RANK", std::to_string(r.localRank)}, {"LOCAL_WORLD_SIZE", std::to_string(r.localSize)},
           {"GROUP_RANK", std::to_string(r.node)},      {"DTRAIN_STORE", store},
           {"DTRAIN_RUN_ID", runId}};
  return o;
}

// /dev/shm names a shm communicator created by process `pid` would have.
bool shmLeftBy(pid_t pid) {
  const std::string prefix = "dtrain-shm-" + std::to_string(pid) + "-";
  bool found = false;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) found |= std::string(e->d_name).rfind(prefix, 0) == 0;
    ::closedir(d);
  }
  return found;
}

class Workers {
 public:
  Workers(const std::vector<Rank>& ranks, const std::vector<std::string>& args, const std::string& runId) {
    rendezvous::TcpStoreServerOptions so;
    so.host = "127.0.0.1";
    server_ = rendezvous::TcpStoreServer::start(so);
    for (const auto& r : ranks) {
      std::vector<std::string> argv{dtrainBinary()};
      argv.insert(argv.end(), args.begin(), args.end());
      procs_.push_back(std::make_unique<Background>(argv, workerEnv(r, server_->address(), runId)));
    }
  }
  Background& operator[](size_t i) { return *procs_[i]; }
  size_t size() const { return procs_.size(); }

 private:
  std::unique_ptr<rendezvous::TcpStoreServer> server_;
  std::vector<std::unique_ptr<Background>> procs_;
};

}  // namespace

TEST_CASE("bench workers in separate processes agree on every size: tcp, shm, hier") {
  struct Case {
    const char* backend;
    int n, nodes;
  };
  for (Case c : {Case{"tcp", 3, 1}, Case{"shm", 3, 1}, Case{"hier", 4, 2}, Case{"auto", 4, 2}}) {
    CAPTURE(std::string(c.backend));
    Workers w(layout(c.n, c.nodes),
              {"bench", "allreduce", "--backend", c.backend, "--min-bytes", "1K", "--max-bytes", "1M",
               "--step-factor", "8", "--budget", "20ms", "--json"},
              std::string("proc-") + c.backend);
    std::vector<RunResult> results;
    for (size_t i = 0; i < w.size(); ++i) results.push_back(w[i].wait(120s));
    for (size_t i = 0; i < results.size(); ++i) {
      CAPTURE(i);
      CAPTURE(results[i].err);
      CHECK(results[i].exitCode == 0);
    }
    // Rank 0 prints one JSON line per size: 1K, 8K, 64K, 512K.
    const std::string& out = results[0].out;
    CHECK(out.find("\"bytes\": 1024,") != std::string::npos);
    CHECK(out.find("\"bytes\": 524288,") != std::string::npos);
    CHECK(out.find("\"wrong\": 0}") != std::string::npos);
    CHECK(out.find("\"wrong\": 1") == std::string::npos);
    if (std::string(c.backend) == "auto") CHECK(out.find("\"backend\": \"hier\"") != std::string::npos);
    for (size_t i = 1; i < results.size(); ++i) CHECK(results[i].out.empty());  // only rank 0 prints
    CHECK_FALSE(shmLeftBy(w[0].pid()));
  }
}

TEST_CASE("a rank killed mid-collective fails the others at once; one stopped fails them at the timeout") {
  for (std::string backend : {"tcp", "shm", "hier"}) {
    for (bool kill : {true, false}) {
      CAPTURE(backend);
      CAPTURE(kill);
      const int n = 3;
      // A killed peer must be noticed long before the 60 s timeout; a stopped one only by the 2 s timeout.
      Workers w(layout(n, backend == "hier" ? 2 : 1),
                {"bench", "allreduce", "--backend", backend, "--min-bytes", "4M", "--max-bytes", "4M", "--iters",
                 "1000000", "--no-check", "--timeout", kill ? "60s" : "2s"},
                "fail-" + backend);
      for (size_t i = 0; i < w.size(); ++i) w[i].waitForLine("communicator ready", 60s, true);
      // The timed loop has started (or is about to); kill or freeze rank 1 inside it.
      const auto start = std::chrono::steady_clock::now();
      w[1].signal(kill ? SIGKILL : SIGSTOP);
      int timedOut = 0;
      for (size_t i : {size_t{0}, size_t{2}}) {
        RunResult r = w[i].wait(60s);
        CAPTURE(i);
        CAPTURE(r.err);
        CHECK_FALSE(r.timedOut);
        CHECK(r.exitCode == 7);  // ExitCode::kComm
        CHECK(r.err.find("dtrain: error:") != std::string::npos);
        CHECK(r.err.find("rank") != std::string::npos);
        timedOut += r.err.find("timed out") != std::string::npos ? 1 : 0;
      }
      // A stopped peer is only detectable by the timeout; whoever times out first may end the others sooner
      // (its exit resets their connections), so at least one survivor reports the timeout itself.
      if (!kill) CHECK(timedOut >= 1);
      const auto took = std::chrono::steady_clock::now() - start;
      CHECK(took < (kill ? 10s : 30s));
      if (!kill) w[1].signal(SIGKILL);
      w[1].wait(30s);
      CHECK_FALSE(shmLeftBy(w[0].pid()));
    }
  }
}

TEST_CASE("dtrain run launches dtrain bench allreduce as its workers") {
  RunOptions o;
  o.timeout = 120s;
  RunResult r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", "--", dtrainBinary(), "bench",
                     "allreduce", "--backend", "shm", "--max-bytes", "64K", "--budget", "20ms"},
                    o);
  CAPTURE(r.out);
  CAPTURE(r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("backend shm, 2 rank(s)") != std::string::npos);
  CHECK(r.out.find("65536") != std::string::npos);
}
