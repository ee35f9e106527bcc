// --rdzv-backend etcd against a real etcd (Debian etcd-server): the Store contract over etcd's JSON gateway,
// the rendezvous protocol over it, a 2-node job, a 3-member etcd cluster losing a member mid-job, and the etcd
// leader restarting mid-job. Skipped (with a message) when etcd is not installed; scripts/setup installs it.
#include <doctest/doctest.h>

#include <signal.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "lib/common/error.h"
#include "rendezvous/etcd_store.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/rendezvous.h"
#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"
#include "tests/rendezvous/store_batch_contract.h"
#include "tests/support/etcd_cluster.h"

using namespace dtrain;
using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

#define SKIP_WITHOUT_ETCD()                                                         \
  if (!EtcdCluster::available()) {                                                  \
    MESSAGE("skipped: etcd is not installed (scripts/setup installs etcd-server)"); \
    return;                                                                         \
  }

std::shared_ptr<rendezvous::EtcdStore> connect(const std::string& endpoints, std::string prefix = "/t/") {
  rendezvous::EtcdStoreOptions o;
  o.endpoints = *rendezvous::parseEtcdEndpoints(endpoints);
  o.prefix = std::move(prefix);
  o.connectTimeout = 30s;
  auto s = rendezvous::EtcdStore::connect(o);
  s->setTimeout(30s);
  return s;
}

std::string etcdTempDir(const std::string& tag) {
  auto d = std::filesystem::temp_directory_path() / uniqueRunId(tag);
  std::filesystem::create_directories(d);
  return d.string();
}

// A worker program that lasts until `gate` exists (the test creates it once the etcd fault is over), so the
// job surely spans the fault; it prints its rank first so the test knows the round formed.
std::vector<std::string> gatedProgram(const std::string& gate) {
  return {"--", "/bin/sh", "-c",
          fmt::format("echo started rank $RANK of $WORLD_SIZE; while [ ! -e {} ]; do sleep 0.1; done; echo done", gate)};
}

std::vector<std::string> agentArgs(const std::string& endpoints, const std::string& id, std::vector<std::string> tail) {
  std::vector<std::string> a{"--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "etcd", "--rdzv-endpoint",
                             endpoints, "--rdzv-id", id, "--local-addr", "127.0.0.1", "--heartbeat-timeout", "20s",
                             "--rdzv-timeout", "120s"};
  a.insert(a.end(), tail.begin(), tail.end());
  return runArgs(a);
}

}  // namespace

TEST_CASE("the Store contract over etcd: set/get/add/compareSet/append/check/wait/remove/numKeys") {
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  auto s = connect(etcd.endpoint(0));
  CHECK_FALSE(s->tryGet("a").has_value());
  s->set("a", std::string("x\0y", 3));
  CHECK(s->get("a") == std::string("x\0y", 3));
  s->set("empty", "");
  CHECK(s->tryGet("empty") == std::optional<std::string>(""));
  CHECK(s->add("n", 5) == 5);
  CHECK(s->add("n", -2) == 3);
  CHECK(s->add("n", 0) == 3);
  // compareSet: a missing key matches "", a mismatch returns the current value, a match writes.
  CHECK(s->compareSet("c", "", "one") == "one");
  CHECK(s->compareSet("c", "", "two") == "one");
  CHECK(s->compareSet("c", "zzz", "two") == "one");
  CHECK(s->compareSet("c", "one", "two") == "two");
  CHECK(s->compareSet("missing", "x", "y") == "");
  CHECK_FALSE(s->tryGet("missing").has_value());
  CHECK(s->compareSet("empty", "", "filled") == "filled");
  s->append("log", "ab");
  s->append("log", "cd");
  CHECK(s->get("log") == "abcd");
  CHECK(s->check({"a", "n"}));
  CHECK_FALSE(s->check({"a", "nope"}));
  CHECK(s->numKeys() == 5);
  CHECK(s->remove("a"));
  CHECK_FALSE(s->remove("a"));
  CHECK(s->numKeys() == 4);
  // wait: false at the timeout; true once another client creates the key (through a watch).
  CHECK_FALSE(s->wait({"later"}, 300ms));
  auto other = s->clone();
  std::thread writer([&] { other->set("later", "1"); });
  CHECK(s->wait({"later", "n"}, 30s));
  writer.join();
  CHECK_THROWS_AS(s->get("never", 200ms), TimeoutError);
  // Keys of another prefix are not counted.
  connect(etcd.endpoint(0), "/other/")->set("k", "v");
  CHECK(s->numKeys() == 5);
}

TEST_CASE("batches over etcd: runs of set/get/remove are one txn of at most 128 operations") {
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  auto s = connect(etcd.endpoint(0));
  auto other = connect(etcd.endpoint(0));
  checkBatchContract(*s, *other);

  std::vector<std::pair<std::string, std::string>> entries;
  for (int i = 0; i < 300; ++i) entries.emplace_back(fmt::format("m/{}", i), std::to_string(i));
  auto before = s->requests();
  s->multiSet(entries);
  CHECK(s->requests() - before == 3);  // 128 + 128 + 44
  std::vector<std::string> keys;
  for (int i = 0; i < 300; ++i) keys.push_back(fmt::format("m/{}", i));
  before = s->requests();
  auto values = s->multiGet(keys);
  CHECK(s->requests() - before == 3);
  CHECK(values[299] == "299");
  // A heartbeat-shaped batch: one request.
  before = s->requests();
  auto r = s->batch({rendezvous::StoreOp::set("m/0", "x"), rendezvous::StoreOp::tryGet("m/1"),
                     rendezvous::StoreOp::tryGet("m/2")});
  CHECK(s->requests() - before == 1);
  CHECK(r[2].value == "2");
}

TEST_CASE("endpoint failover: a dead endpoint first in the list is skipped") {
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  auto dead = fmt::format("127.0.0.1:{}", net::pickFreePort("127.0.0.1"));
  auto s = connect(dead + "," + etcd.endpoint(0));
  s->set("k", "v");
  CHECK(s->get("k") == "v");
  CHECK(s->currentEndpoint() == etcd.endpoint(0));
  CHECK(s->address() == "etcd://" + dead + "," + etcd.endpoint(0));
  // No endpoint at all: a RendezvousError naming them, after the connect timeout.
  rendezvous::EtcdStoreOptions o;
  o.endpoints = *rendezvous::parseEtcdEndpoints(dead);
  o.connectTimeout = 500ms;
  CHECK_THROWS_AS(rendezvous::EtcdStore::connect(o), RendezvousError);
}

TEST_CASE("the rendezvous protocol over etcd: three agents form one round and see one event") {
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  const int n = 3;
  std::vector<rendezvous::RoundInfo> rounds(n);
  std::vector<std::thread> agents;
  for (int i = 0; i < n; ++i)
    agents.emplace_back([&, i] {
      auto store = std::make_shared<rendezvous::PrefixStore>(rendezvous::runPrefix("etcd-rdzv"),
                                                             connect(etcd.endpoint(0), ""));
      rendezvous::RendezvousOptions ro;
      ro.minNodes = ro.maxNodes = n;
      ro.joinTimeout = 60s;
      rendezvous::NodeInfo self;
      self.nproc = i + 1;
      self.host = "127.0.0.1";
      self.hostname = fmt::format("node{}", i);
      self.pid = 100 + i;
      rendezvous::Rendezvous rdzv(store, ro, self);
      rounds[static_cast<size_t>(i)] = rdzv.join();
      rdzv.heartbeat(rounds[static_cast<size_t>(i)]);
    });
  for (auto& t : agents) t.join();
  for (const auto& r : rounds) {
    CHECK(r.numNodes == n);
    CHECK(r.worldSize == 6);
    CHECK(r.members.size() == static_cast<size_t>(n));
    CHECK(r.members[static_cast<size_t>(r.nodeRank)].rankOffset == r.rankOffset);
    CHECK(r.masterAddr == "127.0.0.1");
  }
  auto watcher = std::make_shared<rendezvous::PrefixStore>(rendezvous::runPrefix("etcd-rdzv"), connect(etcd.endpoint(0), ""));
  std::optional<rendezvous::RoundEvent> seen;
  std::thread w([&] { seen = rendezvous::Rendezvous::waitEvent(*watcher, rounds[0].round, 30s); });
  rendezvous::Rendezvous ender(watcher, {}, {});
  ender.endRound(rounds[0].round, {rendezvous::RoundEventType::kShutdown, "test", 0, ""});
  w.join();
  REQUIRE(seen.has_value());
  CHECK(seen->type == rendezvous::RoundEventType::kShutdown);
}

TEST_CASE("a 2-node training job rendezvouses and bootstraps its workers through etcd") {
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  auto dir = etcdTempDir("etcd-job");
  auto job = smallJob(64, 8, 1);
  job["checkpoint"] = false;
  std::ofstream(dir + "/job.json") << job.dump();
  auto id = uniqueRunId("etcd2");
  RunOptions ro;
  ro.timeout = 180s;
  ro.cwd = dir;
  Background a(agentArgs(etcd.endpoint(0), id, {dir + "/job.json"}), ro);
  Background b(agentArgs(etcd.endpoint(0), id, {dir + "/job.json"}), ro);
  auto ra = a.wait(180s);
  auto rb = b.wait(180s);
  INFO("node a: " << ra.out << ra.err);
  INFO("node b: " << rb.out << rb.err);
  CHECK(ra.exitCode == 0);
  CHECK(rb.exitCode == 0);
  // Two nodes of one worker each formed one world of 2 ranks (rank 0 logs) and trained to the end.
  auto all = ra.out + rb.out;
  CHECK(all.find("[n0 r0] job:") != std::string::npos);
  CHECK(all.find("2 rank(s)") != std::string::npos);
  CHECK(all.find("[n0 r0] done:") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("elastic over etcd: a node SIGKILLed mid-training is lost, and the survivor re-forms and finishes") {
  // The dead agent's heartbeat key goes with its etcd lease; that used to count as a beat, so the loss showed a
  // second heartbeat timeout later, after the survivor's broken all-reduce (exit 7) had been published as the
  // failure: exit 7 instead of a re-formation.
  SKIP_WITHOUT_ETCD();
  EtcdCluster etcd(1);
  auto dir = etcdTempDir("etcd-elastic");
  auto job = smallJob(4000, 8, 1);
  job["train"]["max_steps"] = 200;
  job["checkpoint"] = {{"every_steps", 2}, {"keep", 2}};
  job["parallel"] = {{"timeout", 30}};
  std::ofstream(dir + "/job.json") << job.dump();
  auto id = uniqueRunId("etcdel");
  RunOptions ro;
  ro.timeout = 180s;
  ro.cwd = dir;
  ro.env = {{"DTRAIN_STEP_PAUSE", "25ms"}};
  auto args = [&](int nodeRank) {
    return runArgs({"--nnodes", "1:2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-backend", "etcd", "--rdzv-endpoint", etcd.endpoint(0), "--rdzv-id", id, "--local-addr",
                    "127.0.0.1", "--heartbeat-timeout", "3s", "--rdzv-last-call", "2s", "--rdzv-timeout", "120s",
                    dir + "/job.json"});
  };
  Background a(args(0), ro);
  Background b(args(1), ro);
  a.waitForLine("step 3/", 120s);  // both nodes train (rank 0 is node 0's)
  b.signal(SIGKILL);
  auto ra = a.wait(120s);
  INFO("node a: " << ra.out << ra.err);
  CHECK_FALSE(ra.timedOut);
  CHECK(ra.exitCode == 0);
  CHECK(ra.err.find("re-forming the group: node 1") != std::string::npos);
  CHECK(ra.out.find("done: 200 steps") != std::string::npos);
  b.wait(30s);
  CHECK(processesWithRunId(id).empty());
  std::filesystem::remove_all(dir);
}

namespace {

// Two agents on a 3-member etcd cluster; `fault` runs once both workers started; then the gate opens and both
// agents must finish the same round with exit 0 (no restart: the job continued through the fault).
void survivesEtcdFault(const std::function<void(EtcdCluster&)>& fault, int firstEndpoint) {
  EtcdCluster etcd(3);
  auto dir = etcdTempDir("etcd-fault");
  auto gate = dir + "/gate";
  auto id = uniqueRunId("etcdf");
  RunOptions ro;
  ro.timeout = 180s;
  Background a(agentArgs(etcd.endpoints(firstEndpoint), id, gatedProgram(gate)), ro);
  Background b(agentArgs(etcd.endpoints(firstEndpoint), id, gatedProgram(gate)), ro);
  a.waitForLine("started rank", 120s);
  b.waitForLine("started rank", 120s);
  fault(etcd);
  std::ofstream(gate) << "go";
  auto ra = a.wait(120s);
  auto rb = b.wait(120s);
  INFO("node a: " << ra.out << ra.err);
  INFO("node b: " << rb.out << rb.err);
  CHECK(ra.exitCode == 0);
  CHECK(rb.exitCode == 0);
  for (const auto* r : {&ra, &rb}) {
    CHECK(r->out.find("done") != std::string::npos);
    CHECK(r->err.find("restart") == std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace

TEST_CASE("a 3-member etcd cluster losing the member the agents use mid-job: the job continues") {
  SKIP_WITHOUT_ETCD();
  survivesEtcdFault(
      [](EtcdCluster& etcd) {
        etcd.stop(0, SIGKILL);
        etcd.waitHealthy(60s);  // the two survivors keep (or elect) a leader
      },
      0);
}

TEST_CASE("the etcd leader restarting mid-job: the job continues") {
  SKIP_WITHOUT_ETCD();
  survivesEtcdFault(
      [](EtcdCluster& etcd) {
        int leader = etcd.leader();
        REQUIRE(leader >= 0);
        etcd.stop(leader, SIGTERM);
        etcd.start(leader);
        etcd.waitHealthy(60s);
      },
      0);
}
