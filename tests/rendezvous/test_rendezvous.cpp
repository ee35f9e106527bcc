// The rendezvous protocol (rendezvous/rendezvous.h) over the in-memory store, one thread per node: the store
// semantics are the TCP server's (MemoryStore runs the same StoreState), so what holds here holds between
// processes. Every wait is the store's own (condition variable, with a timeout); nothing sleeps to synchronise.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "rendezvous/memory_store.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/rendezvous.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;

namespace {

// One job's keys on a shared in-memory store, as every agent of a run sees them (/dtrain/<run_id>/).
class Job {
 public:
  Job() : base_(MemoryStore::create()), store_(std::make_shared<PrefixStore>("/dtrain/test/", base_)) {}
  StorePtr store() const { return store_; }

  // An agent ("node") of this job. Agents are separate objects as they are separate processes; only the store
  // is shared.
  std::unique_ptr<Rendezvous> agent(const std::string& name, RendezvousOptions options, int nproc = 1,
                                    int nodeRank = -1) {
    NodeInfo self;
    self.requestedNodeRank = nodeRank;
    self.nproc = nproc;
    self.host = name + ".example";
    self.hostname = name;
    self.pid = ++pids_;
    self.masterPort = static_cast<uint16_t>(29500 + pids_);
    options.endpoint = "memory";
    return std::make_unique<Rendezvous>(store_, options, self);
  }

 private:
  std::shared_ptr<MemoryStore> base_;
  StorePtr store_;
  int pids_ = 100;
};

RendezvousOptions nodes(int minNodes, int maxNodes, Millis lastCall = 30s, Millis joinTimeout = 30s) {
  RendezvousOptions o;
  o.minNodes = minNodes;
  o.maxNodes = maxNodes;
  o.lastCall = lastCall;
  o.joinTimeout = joinTimeout;
  return o;
}

// join() on its own thread, as each agent runs it in its own process.
std::future<RoundInfo> joinAsync(Rendezvous& r) {
  return std::async(std::launch::async, [&r] { return r.join(); });
}

std::vector<RoundInfo> joinAll(const std::vector<Rendezvous*>& agents) {
  std::vector<std::future<RoundInfo>> pending;
  for (auto* a : agents) pending.push_back(joinAsync(*a));
  std::vector<RoundInfo> rounds;
  for (auto& f : pending) rounds.push_back(f.get());
  return rounds;
}

std::string errorOf(std::future<RoundInfo>& f) {
  try {
    f.get();
  } catch (const RendezvousError& e) {
    return e.what();
  }
  return "(no RendezvousError)";
}

// Every agent of a round sees the same members in the same order, itself among them at its node rank, and
// ranks contiguous per node in that order.
void checkConsistent(const std::vector<RoundInfo>& rounds) {
  const RoundInfo& first = rounds.front();
  std::vector<int> nodeRanks;
  for (const auto& r : rounds) {
    CHECK(r.round == first.round);
    CHECK(r.restartCount == first.restartCount);
    REQUIRE(r.numNodes == static_cast<int>(rounds.size()));
    REQUIRE(r.members.size() == rounds.size());
    int offset = 0;
    for (int i = 0; i < r.numNodes; ++i) {
      CHECK(r.members[i].nodeRank == i);
      CHECK(r.members[i].rankOffset == offset);
      CHECK(r.members[i].info.pid == first.members[i].info.pid);
      offset += r.members[i].info.nproc;
    }
    CHECK(r.worldSize == offset);
    CHECK(r.rankOffset == r.members[r.nodeRank].rankOffset);
    CHECK(r.masterAddr == r.members.front().info.host);
    CHECK(r.masterPort == r.members.front().info.masterPort);
    nodeRanks.push_back(r.nodeRank);
  }
  std::sort(nodeRanks.begin(), nodeRanks.end());
  for (size_t i = 0; i < nodeRanks.size(); ++i) CHECK(nodeRanks[i] == static_cast<int>(i));
}

RoundEvent event(RoundEventType type, std::string message = "", int exitCode = 0) {
  return RoundEvent{type, std::move(message), exitCode, ""};
}

}  // namespace

TEST_CASE("round events keep their wire names in the store") {
  const std::pair<RoundEventType, const char*> names[] = {{RoundEventType::kFailed, "failed"},
                                                          {RoundEventType::kNodeLost, "node_lost"},
                                                          {RoundEventType::kMembership, "membership"},
                                                          {RoundEventType::kShutdown, "shutdown"},
                                                          {RoundEventType::kDone, "done"}};
  for (const auto& [type, name] : names) {
    CAPTURE(name);
    CHECK(roundEventName(type) == name);
    CHECK(parseRoundEventType(name) == type);
    RoundEvent e{type, "one line", 130, "multi\nline"};
    auto json = e.toJson();
    CHECK(json.find(std::string("\"type\":\"") + name + "\"") != std::string::npos);
    auto back = RoundEvent::fromJson(json);
    CHECK(back.type == type);
    CHECK(back.message == "one line");
    CHECK(back.exitCode == 130);
    CHECK(back.report == "multi\nline");
  }
  CHECK(RoundEvent{RoundEventType::kFailed, "", 1, ""}.toJson() ==
        R"({"exit_code":1,"message":"","report":"","type":"failed"})");
  CHECK_FALSE(parseRoundEventType("crashed").has_value());
  CHECK_THROWS_AS(RoundEvent::fromJson(R"({"type":"crashed"})"), ProtocolError);
  CHECK_THROWS_AS(RoundEvent::fromJson("not json"), ProtocolError);
  CHECK(RoundEvent{RoundEventType::kNodeLost, "", 0, ""}.isFailure());
  CHECK(RoundEvent{RoundEventType::kFailed, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kMembership, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kShutdown, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kDone, "", 0, ""}.isFailure());
}

TEST_CASE("join: min == max nodes form one round; ranks are contiguous per node, nodes may differ in nproc") {
  Job job;
  auto a = job.agent("a", nodes(3, 3), 2);
  auto b = job.agent("b", nodes(3, 3), 1);
  auto c = job.agent("c", nodes(3, 3), 3);
  auto rounds = joinAll({a.get(), b.get(), c.get()});
  checkConsistent(rounds);
  CHECK(rounds[0].round == 0);
  CHECK(rounds[0].restartCount == 0);
  CHECK(rounds[0].worldSize == 6);
  // Each agent finds itself at its node rank.
  CHECK(rounds[0].members[rounds[0].nodeRank].info.hostname == "a");
  CHECK(rounds[1].members[rounds[1].nodeRank].info.hostname == "b");
  CHECK(rounds[2].members[rounds[2].nodeRank].info.hostname == "c");
}

TEST_CASE("join: given node ranks order the members, whatever the join order") {
  Job job;
  auto a = job.agent("a", nodes(3, 3), 1, 2);
  auto b = job.agent("b", nodes(3, 3), 2, 0);
  auto c = job.agent("c", nodes(3, 3), 1, 1);
  auto rounds = joinAll({a.get(), b.get(), c.get()});
  checkConsistent(rounds);
  CHECK(rounds[0].nodeRank == 2);
  CHECK(rounds[1].nodeRank == 0);
  CHECK(rounds[2].nodeRank == 1);
  CHECK(rounds[0].rankOffset == 3);  // after b's two ranks and c's one
  CHECK(rounds[0].masterAddr == "b.example");
}

TEST_CASE("join: two agents claiming the same node rank are refused") {
  Job job;
  auto a = job.agent("a", nodes(2, 2), 1, 0);
  auto b = job.agent("b", nodes(2, 2), 1, 0);
  auto fa = joinAsync(*a);
  auto fb = joinAsync(*b);
  CHECK(errorOf(fa).find("node rank 0 is claimed by two agents") != std::string::npos);
  CHECK(errorOf(fb).find("node rank 0 is claimed by two agents") != std::string::npos);
}

TEST_CASE("join: an agent of another job (another fingerprint) on the same run id is refused, naming both") {
  Job job;
  auto withFp = [](std::string fp, Millis joinTimeout) {
    auto o = nodes(2, 2, 30s, joinTimeout);
    o.jobFingerprint = std::move(fp);
    return o;
  };
  auto a = job.agent("a", withFp("aaaa `train.py --lr 1`", 30s));
  auto b = job.agent("b", withFp("bbbb `other.py`", 30s));
  auto fa = joinAsync(*a);
  REQUIRE(job.store()->wait({"job"}, 10s));  // a's job owns the run id
  auto fb = joinAsync(*b);
  auto message = errorOf(fb);
  CHECK(message.find("(job aaaa `train.py --lr 1`); this is job bbbb `other.py`") != std::string::npos);
  CHECK(message.find("another job already uses this run id") != std::string::npos);
  CHECK(message.find("--rdzv-id") != std::string::npos);
  // An agent of the same job (same fingerprint) joins the first one's round.
  auto c = job.agent("c", withFp("aaaa `train.py --lr 1`", 30s));
  auto fc = joinAsync(*c);
  CHECK(fa.get().numNodes == 2);
  CHECK(fc.get().numNodes == 2);
  // Once that job ended, another one is still refused, and told that the job under the id is over (the message
  // read as if a job were still running under it).
  a->recordEnd(event(RoundEventType::kDone, "", 0));
  auto d = job.agent("d", withFp("dddd `later.py`", 30s));
  auto fd = joinAsync(*d);
  const std::string ended = errorOf(fd);
  CHECK(ended.find("another job already uses this run id") != std::string::npos);
  CHECK_MESSAGE(ended.find("(job aaaa `train.py --lr 1`, which has ended: it completed); this is job dddd") !=
                    std::string::npos,
                ended);
}

TEST_CASE("join: a round short of nodes times out naming what is missing") {
  Job job;
  auto a = job.agent("a", nodes(2, 2, 30s, 300ms));
  auto f = joinAsync(*a);
  auto message = errorOf(f);
  CHECK(message.find("1 of 2 node(s) joined (need 2)") != std::string::npos);
  CHECK(message.find("--rdzv-id") != std::string::npos);
}

TEST_CASE("last call: below min nodes the round never closes, however short the last call") {
  Job job;
  auto a = job.agent("a", nodes(2, 3, 1ms, 300ms));
  auto f = joinAsync(*a);
  CHECK(errorOf(f).find("1 of 3 node(s) joined (need 2)") != std::string::npos);
}

TEST_CASE("last call: with min nodes joined the round closes once the last call passed") {
  Job job;
  const Millis lastCall = 200ms;
  auto a = job.agent("a", nodes(2, 4, lastCall));
  auto b = job.agent("b", nodes(2, 4, lastCall));
  Clock::time_point start = Clock::now();
  auto rounds = joinAll({a.get(), b.get()});
  CHECK(Clock::now() - start >= lastCall);  // it waited for more nodes
  checkConsistent(rounds);
  CHECK(rounds[0].numNodes == 2);
}

TEST_CASE("last call: max nodes close the round at once") {
  Job job;
  // A last call this long outlasts the join timeout: only reaching max nodes can close the round in time.
  auto a = job.agent("a", nodes(1, 2, 1h));
  auto b = job.agent("b", nodes(1, 2, 1h));
  auto rounds = joinAll({a.get(), b.get()});
  checkConsistent(rounds);
  CHECK(rounds[0].numNodes == 2);
}

TEST_CASE("round end: the first event wins and every agent sees it") {
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  auto rounds = joinAll({a.get(), b.get()});
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 0ms).has_value());
  auto won = a->endRound(0, event(RoundEventType::kFailed, "worker failed", 3));
  CHECK(won.type == RoundEventType::kFailed);
  auto lost = b->endRound(0, event(RoundEventType::kNodeLost, "node a is silent", 4));
  CHECK(lost.type == RoundEventType::kFailed);
  CHECK(lost.exitCode == 3);
  auto seen = Rendezvous::waitEvent(*job.store(), 0, 10s);
  REQUIRE(seen.has_value());
  CHECK(seen->message == "worker failed");
}

TEST_CASE("advance: a restart adds one to the restarts, a re-formation one to the re-formations") {
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  auto r0 = joinAll({a.get(), b.get()});
  CHECK(r0[0].round == 0);

  a->endRound(0, event(RoundEventType::kFailed, "worker failed", 1));
  // Each agent advances on its own; the second advance is a no-op.
  a->advance(0, true);
  b->advance(0, true);
  auto r1 = joinAll({a.get(), b.get()});
  checkConsistent(r1);
  CHECK(r1[0].round == 1);
  CHECK(r1[0].restartCount == 1);
  CHECK(r1[0].reformCount == 0);

  b->endRound(1, event(RoundEventType::kMembership, "node c asks to join"));
  b->advance(1, false);
  a->advance(1, false);
  auto r2 = joinAll({a.get(), b.get()});
  checkConsistent(r2);
  CHECK(r2[0].round == 2);
  CHECK(r2[0].restartCount == 1);
  CHECK(r2[0].reformCount == 1);

  b->endRound(2, event(RoundEventType::kNodeLost, "node a is silent", 4));
  a->advance(2, true);  // agents may advance in any order, even before the event reached them
  b->advance(2, true);
  auto r3 = joinAll({a.get(), b.get()});
  CHECK(r3[0].round == 3);
  CHECK(r3[0].restartCount == 2);
  CHECK(r3[0].reformCount == 1);
}

TEST_CASE("done: the last node to finish ends the round, and the run id cannot be reused") {
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  auto rounds = joinAll({a.get(), b.get()});
  a->markFinished(rounds[0]);
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 0ms).has_value());
  b->markFinished(rounds[1]);
  auto done = Rendezvous::waitEvent(*job.store(), 0, 10s);
  REQUIRE(done.has_value());
  CHECK(done->type == RoundEventType::kDone);

  // Terminal outcome: the host waits until every agent acknowledged it.
  a->acknowledgeEnd(rounds[0]);
  CHECK_FALSE(a->waitAcknowledged(rounds[0], 0ms));
  b->acknowledgeEnd(rounds[1]);
  CHECK(a->waitAcknowledged(rounds[0], 10s));

  auto late = job.agent("late", nodes(1, 1));
  auto f = joinAsync(*late);
  CHECK(errorOf(f).find("already completed a job on this store") != std::string::npos);
}

TEST_CASE("a failed or interrupted job's run id: a later join fails at once, naming the outcome") {
  Job job;
  auto a = job.agent("a", nodes(1, 1));
  auto rounds = joinAll({a.get()});
  a->endRound(0, event(RoundEventType::kShutdown, "node a was stopped by SIGTERM", 128 + 15));
  a->recordEnd(event(RoundEventType::kShutdown, "node a was stopped by SIGTERM", 128 + 15));
  // The first record wins: a second agent's view of the same end does not overwrite it.
  a->recordEnd(event(RoundEventType::kFailed, "worker failed", 1));

  auto start = Clock::now();
  auto late = job.agent("late", nodes(1, 1, 30s, /*joinTimeout=*/60s));
  auto f = joinAsync(*late);
  auto error = errorOf(f);
  CHECK(error.find("already ended (shutdown, exit code 143: node a was stopped by SIGTERM)") != std::string::npos);
  CHECK(error.find("--rdzv-id") != std::string::npos);
  CHECK(Clock::now() - start < 10s);  // not the join timeout
}

TEST_CASE("a node waiting for the next round learns within a second that the job ended") {
  Job job;
  auto a = job.agent("a", nodes(1, 1));
  auto rounds = joinAll({a.get()});
  // Round 0 closed without the late node (elastic, up to 2 nodes): it asks to join, then waits for round 1.
  auto late = job.agent("late", nodes(1, 2, 30s, /*joinTimeout=*/60s));
  auto start = Clock::now();
  auto f = joinAsync(*late);
  auto ev = Rendezvous::waitEvent(*job.store(), 0, 10s);
  REQUIRE(ev.has_value());
  CHECK(ev->type == RoundEventType::kMembership);
  // The job ends instead of re-forming (say, its agent was out of re-formations).
  a->recordEnd(event(RoundEventType::kFailed, "worker failed: exit code 3", 3));
  auto error = errorOf(f);
  CHECK(error.find("the job ended while this node waited for a round that would include it (failed, exit code 3: "
                   "worker failed: exit code 3)") != std::string::npos);
  CHECK(Clock::now() - start < 10s);
}

TEST_CASE("heartbeats: a member whose counter stops moving is reported silent; beating again clears it") {
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  auto rounds = joinAll({a.get(), b.get()});
  const RoundInfo& ra = rounds[0];
  const RoundInfo& rb = rounds[1];
  const int bRank = rb.nodeRank;

  a->heartbeat(ra);
  b->heartbeat(rb);
  // A counter that moved since the last look is never silent, whatever the timeout; nor is the caller itself.
  CHECK(a->silentMembers(ra, 0ms).empty());
  CHECK(b->silentMembers(rb, 0ms).empty());
  CHECK(a->silentMembers(ra, 1h).empty());

  // b stops beating: a reports it once the (short) timeout passed without a change. The store's timed wait on a
  // key nobody sets paces the checks.
  std::vector<int> silent;
  Deadline deadline(10s);
  while (silent.empty() && !deadline.expired()) {
    silent = a->silentMembers(ra, 5ms);
    if (silent.empty()) job.store()->wait({"never-set"}, 5ms);
  }
  CHECK(silent == std::vector<int>{bRank});

  b->heartbeat(rb);
  CHECK(a->silentMembers(ra, 1h).empty());
}

TEST_CASE("heartbeats: a counter that vanishes (etcd's lease of a dead agent expired) is no beat") {
  // Over etcd a dead agent's heartbeat key disappears with its lease, about one heartbeat timeout after its last
  // beat. That used to count as a change of the counter and restart the silence clock: the loss was reported a
  // second timeout later, after the survivors' root-cause hold had already turned it into a failure.
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  auto rounds = joinAll({a.get(), b.get()});
  const RoundInfo& ra = rounds[0];
  const RoundInfo& rb = rounds[1];
  b->heartbeat(rb);
  CHECK(a->silentMembers(ra, 1h).empty());  // a has seen b's counter
  job.store()->wait({"never-set"}, 300ms);  // b beats no more
  job.store()->remove(fmt::format("r{}/hb/{}", rb.round, rb.nodeRank));  // its lease expired
  CHECK(a->silentMembers(ra, 200ms) == std::vector<int>{rb.nodeRank});
  CHECK(a->beat(ra, 200ms) == std::vector<int>{rb.nodeRank});
  // A new beat (the agent was alive after all and wrote its key again) is a change.
  b->heartbeat(rb);
  CHECK(a->silentMembers(ra, 200ms).empty());
}

TEST_CASE("scale-up: a node joining a running round asks it to re-form, and the next round includes it") {
  Job job;
  // Round 0 closes with two nodes after a short last call; the third node comes later.
  auto a = job.agent("a", nodes(2, 3, 100ms));
  auto b = job.agent("b", nodes(2, 3, 100ms));
  auto r0 = joinAll({a.get(), b.get()});
  checkConsistent(r0);
  REQUIRE(r0[0].numNodes == 2);

  auto c = job.agent("c", nodes(2, 3));
  auto fc = joinAsync(*c);
  auto ev = Rendezvous::waitEvent(*job.store(), 0, 10s);
  REQUIRE(ev.has_value());
  CHECK(ev->type == RoundEventType::kMembership);
  CHECK(ev->message == "node c (c.example) asks to join");

  // The members re-form (as restarted agents: with a long last call, round 1 can only close at max nodes, so
  // it holds all three whatever the threads' timing).
  a->advance(0, false);
  b->advance(0, false);
  auto a1 = job.agent("a", nodes(2, 3));
  auto b1 = job.agent("b", nodes(2, 3));
  auto fa = joinAsync(*a1);
  auto fb = joinAsync(*b1);
  std::vector<RoundInfo> r1{fa.get(), fb.get(), fc.get()};
  checkConsistent(r1);
  CHECK(r1[0].round == 1);
  CHECK(r1[0].numNodes == 3);
  CHECK(r1[0].restartCount == 0);  // growing the group costs no restart
}

TEST_CASE("scale-up: a node finding the round full waits for a next round, and says so when none opens") {
  Job job;
  auto a = job.agent("a", nodes(2, 2));
  auto b = job.agent("b", nodes(2, 2));
  joinAll({a.get(), b.get()});
  auto c = job.agent("c", nodes(2, 2, 30s, 300ms));
  auto fc = joinAsync(*c);
  CHECK(errorOf(fc).find("round 0 is running with 2 node(s) and no new round opened") != std::string::npos);
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 0ms).has_value());  // a full round is not disturbed
}

// Elastic jobs whose rank grid cannot use every node count (say 2 pipeline stages on one process per node:
// only even counts work). RendezvousOptions::unusableNodes.
RendezvousOptions gridNodes(int minNodes, int maxNodes, std::vector<int> unusable, Millis lastCall = 30s,
                            Millis joinTimeout = 30s) {
  RendezvousOptions o = nodes(minNodes, maxNodes, lastCall, joinTimeout);
  o.unusableNodes = std::move(unusable);
  return o;
}

TEST_CASE("unusable node counts: usableMembers takes the largest usable count within MIN..MAX") {
  RendezvousOptions o = gridNodes(1, 5, {1, 3, 5});
  CHECK(o.usableMembers(1) == 0);
  CHECK(o.usableMembers(2) == 2);
  CHECK(o.usableMembers(3) == 2);
  CHECK(o.usableMembers(4) == 4);
  CHECK(o.usableMembers(9) == 4);  // more joined than MAX: MAX first
  CHECK(gridNodes(3, 5, {4}).usableMembers(2) == 0);  // below MIN
  CHECK(nodes(1, 3).usableMembers(3) == 3);           // every count usable
}

TEST_CASE("unusable node counts: MAX joined but unusable closes with the largest usable count; the rest are spares") {
  Job job;
  // 1..3 nodes, 1 and 3 unusable. The last call outlasts the test: only the third joiner can close the round.
  auto a = job.agent("a", gridNodes(1, 3, {1, 3}, 1h));
  auto b = job.agent("b", gridNodes(1, 3, {1, 3}, 1h));
  auto fa = joinAsync(*a);
  auto fb = joinAsync(*b);
  REQUIRE(job.store()->wait({"r0/node/0", "r0/node/1"}, 10s));  // a and b joined first
  auto c = job.agent("c", gridNodes(1, 3, {1, 3}, 1h, /*joinTimeout=*/60s));
  auto fc = joinAsync(*c);
  std::vector<RoundInfo> r0{fa.get(), fb.get()};
  checkConsistent(r0);
  CHECK(r0[0].numNodes == 2);  // not 3
  // c is a spare: it does not ask the round to re-form (a round of 3 could not run either).
  CHECK(fc.wait_for(300ms) == std::future_status::timeout);
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 0ms).has_value());
  // A member is lost: the survivor and the spare form the next round.
  a->endRound(0, event(RoundEventType::kNodeLost, "node b missed heartbeats"));
  a->advance(0, false);
  auto a1 = job.agent("a", gridNodes(1, 3, {1, 3}, 50ms));
  auto fa1 = joinAsync(*a1);
  std::vector<RoundInfo> r1{fa1.get(), fc.get()};
  checkConsistent(r1);
  CHECK(r1[0].round == 1);
  CHECK(r1[0].numNodes == 2);
}

TEST_CASE("unusable node counts: after the last call a round of an unusable count keeps waiting for another node") {
  Job job;
  auto a = job.agent("a", gridNodes(1, 3, {1, 3}, 1ms));
  auto fa = joinAsync(*a);
  // One node joined, the last call long over: a round of 1 cannot run this job, so none closes.
  CHECK_FALSE(job.store()->wait({"r0/closed"}, 400ms));
  auto b = job.agent("b", gridNodes(1, 3, {1, 3}, 1ms));
  auto fb = joinAsync(*b);
  std::vector<RoundInfo> r0{fa.get(), fb.get()};
  checkConsistent(r0);
  CHECK(r0[0].numNodes == 2);
}

TEST_CASE("unusable node counts: a round that never reaches a usable count times out naming the count it needs") {
  // 2 pipeline stages at one rank per node, --nnodes 1:4, one node left: MIN is met, but 1 node cannot run the
  // job. The message said "1 of 4 node(s) joined (need 1) ... or lower --nnodes".
  Job job;
  auto a = job.agent("a", gridNodes(1, 4, {1, 3}, 1ms, /*joinTimeout=*/300ms));
  auto f = joinAsync(*a);
  const std::string message = errorOf(f);
  CHECK_MESSAGE(message.find("1 of 4 node(s) joined (need 2: this job cannot run on 1 node(s)") != std::string::npos,
                message);
  CHECK(message.find("lower --nnodes") == std::string::npos);
  // The first usable count at or above MIN (or above the joiners).
  CHECK(gridNodes(3, 6, {3, 5}).usableFrom(3) == 4);
  CHECK(gridNodes(1, 4, {1, 3}).usableFrom(2) == 2);
  CHECK(gridNodes(1, 4, {1, 3}).usableFrom(5) == 0);
}

TEST_CASE("unusable node counts: a spare asks to re-form only once the joiners make a larger usable count") {
  Job job;
  auto a = job.agent("a", gridNodes(1, 4, {1, 3}, 50ms));
  auto b = job.agent("b", gridNodes(1, 4, {1, 3}, 50ms));
  auto r0 = joinAll({a.get(), b.get()});
  REQUIRE(r0[0].numNodes == 2);
  auto c = job.agent("c", gridNodes(1, 4, {1, 3}));
  auto fc = joinAsync(*c);
  // 3 nodes cannot run the job: c waits without disturbing the round.
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 400ms).has_value());
  auto d = job.agent("d", gridNodes(1, 4, {1, 3}));
  auto fd = joinAsync(*d);
  auto ev = Rendezvous::waitEvent(*job.store(), 0, 10s);  // 4 can: the round re-forms
  REQUIRE(ev.has_value());
  CHECK(ev->type == RoundEventType::kMembership);
  a->advance(0, false);
  b->advance(0, false);
  auto a1 = job.agent("a", gridNodes(1, 4, {1, 3}, 1h));
  auto b1 = job.agent("b", gridNodes(1, 4, {1, 3}, 1h));
  auto fa = joinAsync(*a1);
  auto fb = joinAsync(*b1);
  std::vector<RoundInfo> r1{fa.get(), fb.get(), fc.get(), fd.get()};
  checkConsistent(r1);
  CHECK(r1[0].round == 1);
  CHECK(r1[0].numNodes == 4);
}

TEST_CASE("a spare that hosts the store says that stopping it ends the job; one that does not, does not") {
  // With --rdzv-backend static, node 0 hosts the store and can end up a spare (after a restart its agent may
  // rejoin third): "waits as a spare" alone reads as "safe to stop", but its exit takes the store away.
  Job job;
  auto a = job.agent("a", gridNodes(1, 3, {1, 3}, 50ms));
  auto b = job.agent("b", gridNodes(1, 3, {1, 3}, 50ms));
  joinAll({a.get(), b.get()});
  std::FILE* captured = std::tmpfile();
  REQUIRE(captured != nullptr);
  std::fflush(stderr);
  const int saved = ::dup(2);
  ::dup2(::fileno(captured), 2);
  RendezvousOptions hostOptions = gridNodes(1, 3, {1, 3});
  hostOptions.hostsStore = true;
  auto c = job.agent("c", hostOptions);
  auto fc = joinAsync(*c);
  auto d = job.agent("d", gridNodes(1, 3, {1, 3}));
  auto fd = joinAsync(*d);
  // Both said their line before counting themselves in `waiting` (join()).
  const auto until = Clock::now() + 10s;
  while (job.store()->add("r0/waiting", 0) < 2 && Clock::now() < until) job.store()->wait({"r1/open"}, 20ms);
  REQUIRE(job.store()->add("r0/waiting", 0) == 2);
  a->recordEnd(event(RoundEventType::kDone, "every node's workers succeeded"));
  CHECK_THROWS_AS(fc.get(), JobEndedWhileWaiting);
  CHECK_THROWS_AS(fd.get(), JobEndedWhileWaiting);
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::rewind(captured);
  std::string text;
  for (int ch; (ch = std::fgetc(captured)) != EOF;) text += static_cast<char>(ch);
  std::fclose(captured);
  INFO(text);
  size_t spareLines = 0, hostLines = 0;
  for (size_t at = 0; (at = text.find("waits as a spare", at)) != std::string::npos; ++at) ++spareLines;
  for (size_t at = 0; (at = text.find("it hosts the rendezvous store, so stopping it ends the job", at)) !=
                      std::string::npos;
       ++at)
    ++hostLines;
  CHECK(spareLines == 2);
  CHECK(hostLines == 1);
}

TEST_CASE("a spare stopped by a signal leaves the counts: the next joiner does not re-form the round, the host does "
          "not wait for it") {
  // A SIGTERMed spare stayed counted: with --nnodes 1:4 and 2 pipeline stages, the next node to join made "4
  // joined" and re-formed the running round (steps redone) into a round of 2 again, and the store's host waited
  // its 5 s linger at the job's end for the dead spare's acknowledgement.
  Job job;
  auto a = job.agent("a", gridNodes(1, 4, {1, 3}, 50ms));
  auto b = job.agent("b", gridNodes(1, 4, {1, 3}, 50ms));
  REQUIRE(joinAll({a.get(), b.get()})[0].numNodes == 2);
  std::atomic<int> armed{0}, pending{0};
  RendezvousOptions co = gridNodes(1, 4, {1, 3});
  co.armStop = [&](bool on) { armed = on ? 1 : 0; };
  co.stopPending = [&] { return pending.load(); };
  auto c = job.agent("c", co);
  auto fc = joinAsync(*c);
  const auto until = Clock::now() + 10s;
  while (armed.load() == 0 && Clock::now() < until) job.store()->wait({"r1/open"}, 20ms);
  REQUIRE(armed.load() == 1);
  pending = 15;  // SIGTERM, recorded by the agent's handler
  REQUIRE(fc.wait_for(10s) == std::future_status::ready);
  try {
    fc.get();
    FAIL("the stopped spare joined a round");
  } catch (const SpareStopped& e) {
    CHECK(e.signal == 15);
    CHECK(std::string(e.what()).find("stopped by signal 15 while waiting as a spare") != std::string::npos);
  }
  CHECK(armed.load() == 0);
  CHECK(job.store()->add("r0/count", 0) == 2);
  CHECK(job.store()->add("r0/waiting", 0) == 0);
  // d makes 3 joiners, not 4: it waits as a spare and leaves the round alone.
  auto d = job.agent("d", gridNodes(1, 4, {1, 3}));
  auto fd = joinAsync(*d);
  CHECK_FALSE(Rendezvous::waitEvent(*job.store(), 0, 400ms).has_value());
  a->recordEnd(event(RoundEventType::kDone, "every node's workers succeeded"));
  CHECK_THROWS_AS(fd.get(), JobEndedWhileWaiting);
  CHECK(a->waitSparesAcknowledged(0, 0ms));  // d acknowledged; c is not waited for
}

TEST_CASE("a spare waits past its join timeout while the round's node 0 beats; it learns when the job completed") {
  Job job;
  auto a = job.agent("a", gridNodes(1, 2, {1}, 1h));
  auto b = job.agent("b", gridNodes(1, 2, {1}, 1h));
  auto r0 = joinAll({a.get(), b.get()});
  auto c = job.agent("c", gridNodes(1, 2, {1}, 1h, /*joinTimeout=*/1s));
  auto fc = joinAsync(*c);
  // Node 0 beats for well over c's join timeout: c keeps waiting.
  Rendezvous& zero = r0[0].nodeRank == 0 ? *a : *b;
  const RoundInfo& zeroInfo = r0[0].nodeRank == 0 ? r0[0] : r0[1];
  for (int beat = 0; beat < 12; ++beat) {
    zero.heartbeat(zeroInfo);
    REQUIRE(fc.wait_for(150ms) == std::future_status::timeout);
  }
  a->recordEnd(event(RoundEventType::kDone, "every node's workers succeeded"));
  try {
    fc.get();
    FAIL("the spare's join returned");
  } catch (const JobEndedWhileWaiting& e) {
    CHECK(e.outcome.type == RoundEventType::kDone);
    CHECK(e.round == 0);
    CHECK(e.members == 2);
    CHECK(std::string(e.what()).find("this node waited for a round that would include it") != std::string::npos);
  }
}

TEST_CASE("a spare whose round's agents vanished gives up one join timeout after the last beat") {
  Job job;
  auto a = job.agent("a", gridNodes(1, 2, {1}, 1h));
  auto b = job.agent("b", gridNodes(1, 2, {1}, 1h));
  joinAll({a.get(), b.get()});
  auto c = job.agent("c", gridNodes(1, 2, {1}, 1h, /*joinTimeout=*/300ms));
  auto fc = joinAsync(*c);
  CHECK(errorOf(fc).find("round 0 is running with 2 node(s) and no new round opened") != std::string::npos);
}

TEST_CASE("a spare whose round's node 0 beat and then stopped says the round's agents are gone, not running") {
  // It said "round 0 is running with 2 node(s)" when every agent of the round had been SIGKILLed.
  Job job;
  auto a = job.agent("a", gridNodes(1, 2, {1}, 1h));
  auto b = job.agent("b", gridNodes(1, 2, {1}, 1h));
  auto r0 = joinAll({a.get(), b.get()});
  Rendezvous& zero = r0[0].nodeRank == 0 ? *a : *b;
  zero.heartbeat(r0[0].nodeRank == 0 ? r0[0] : r0[1]);  // one beat, then the agents "die"
  auto c = job.agent("c", gridNodes(1, 2, {1}, 1h, /*joinTimeout=*/1s));
  auto fc = joinAsync(*c);
  const std::string message = errorOf(fc);
  CHECK_MESSAGE(message.find("round 0 ran with 2 node(s), but its node 0 sent no heartbeat for the last 1 s") !=
                    std::string::npos,
                message);
  CHECK(message.find("is running") == std::string::npos);
}

TEST_CASE("large rounds: each agent reads only its assignment, consistent ranks, and a heartbeat ring that sees every loss") {
  Job job;
  const int n = kFullMembershipNodes + 36;  // 100: past the full-membership size
  std::vector<std::unique_ptr<Rendezvous>> agents;
  std::vector<Rendezvous*> ptrs;
  for (int i = 0; i < n; ++i) {
    agents.push_back(job.agent(fmt::format("node{}", i), nodes(n, n), 1 + i % 3));
    ptrs.push_back(agents.back().get());
  }
  auto rounds = joinAll(ptrs);
  std::vector<int> agentOfRank(n, -1);
  for (int i = 0; i < n; ++i) {
    const auto& r = rounds[static_cast<size_t>(i)];
    CHECK(agentOfRank[static_cast<size_t>(r.nodeRank)] == -1);  // node ranks are a permutation
    agentOfRank[static_cast<size_t>(r.nodeRank)] = i;
    // An agent holds O(1) of the membership: node 0, itself and the watched nodes, each complete.
    auto watched = Rendezvous::watchedMembers(r);
    CHECK(watched.size() == static_cast<size_t>(kRingWatch));
    CHECK(r.members.size() <= static_cast<size_t>(2 + kRingWatch));
    CHECK(r.self().nodeRank == r.nodeRank);
    CHECK(r.self().rankOffset == r.rankOffset);
    CHECK(r.self().info.hostname == fmt::format("node{}", i));
    CHECK(r.self().info.nproc == 1 + i % 3);
    REQUIRE(r.member(0) != nullptr);
    CHECK(r.masterAddr == r.member(0)->info.host);
    for (int w : watched) {
      REQUIRE(r.member(w) != nullptr);
      CHECK_FALSE(r.member(w)->info.hostname.empty());
    }
    CHECK(r.worldSize == rounds[0].worldSize);
    CHECK(r.masterAddr == rounds[0].masterAddr);
    CHECK(r.masterPort == rounds[0].masterPort);
  }
  // Ranks are contiguous per node in node-rank order and cover the world exactly, and whatever an agent knows
  // of another node (offset, nproc, record) is what that node itself was told.
  int offset = 0;
  for (int nr = 0; nr < n; ++nr) {
    const auto& owner = rounds[static_cast<size_t>(agentOfRank[static_cast<size_t>(nr)])];
    CHECK(owner.rankOffset == offset);
    offset += owner.self().info.nproc;
  }
  CHECK(offset == rounds[0].worldSize);
  for (const auto& r : rounds)
    for (const auto& m : r.members) {
      const auto& owner = rounds[static_cast<size_t>(agentOfRank[static_cast<size_t>(m.nodeRank)])];
      CHECK(m.rankOffset == owner.rankOffset);
      CHECK(m.info.nproc == owner.self().info.nproc);
      CHECK(m.info.hostname == owner.self().info.hostname);
      CHECK(m.info.pid == owner.self().info.pid);
    }
  // Every node is watched by someone (its ring predecessors).
  std::vector<int> watchers(n, 0);
  for (const auto& r : rounds)
    for (int w : Rendezvous::watchedMembers(r)) ++watchers[static_cast<size_t>(w)];
  CHECK(std::all_of(watchers.begin(), watchers.end(), [](int c) { return c == kRingWatch; }));

  // Everyone beats but node rank 7: its predecessor reports it.
  for (int i = 0; i < n; ++i)
    if (rounds[static_cast<size_t>(i)].nodeRank != 7) agents[static_cast<size_t>(i)]->heartbeat(rounds[static_cast<size_t>(i)]);
  const int pred = agentOfRank[6];
  auto& watcher = *agents[static_cast<size_t>(pred)];
  const auto& rw = rounds[static_cast<size_t>(pred)];
  CHECK(watcher.silentMembers(rw, 1h).empty());
  std::vector<int> silent;
  Deadline deadline(10s);
  const int next = agentOfRank[8];  // the other watched node keeps beating
  while (silent.empty() && !deadline.expired()) {
    agents[static_cast<size_t>(next)]->heartbeat(rounds[static_cast<size_t>(next)]);
    silent = watcher.silentMembers(rw, 5ms);
    if (silent.empty()) job.store()->wait({"never-set"}, 5ms);
  }
  CHECK(silent == std::vector<int>{7});
  auto ages = watcher.heartbeatAges(rw);
  CHECK(ages[6] == 0.0);
  CHECK(ages[7] >= 0.0);
  CHECK(ages[20] == -1.0);  // not watched by this node
}

TEST_CASE("large rounds: given node ranks order the members, and two claiming one rank are refused, all told") {
  SUBCASE("given ranks") {
    Job job;
    const int n = kFullMembershipNodes + 6;
    std::vector<std::unique_ptr<Rendezvous>> agents;
    std::vector<Rendezvous*> ptrs;
    for (int i = 0; i < n; ++i) {
      agents.push_back(job.agent(fmt::format("node{}", i), nodes(n, n), 2, n - 1 - i));  // reversed
      ptrs.push_back(agents.back().get());
    }
    auto rounds = joinAll(ptrs);
    for (int i = 0; i < n; ++i) {
      const auto& r = rounds[static_cast<size_t>(i)];
      CHECK(r.nodeRank == n - 1 - i);
      CHECK(r.rankOffset == 2 * (n - 1 - i));
      CHECK(r.worldSize == 2 * n);
      CHECK(r.masterAddr == fmt::format("node{}.example", n - 1));
    }
  }
  SUBCASE("a duplicate rank") {
    Job job;
    const int n = kFullMembershipNodes + 6;
    std::vector<std::unique_ptr<Rendezvous>> agents;
    std::vector<std::future<RoundInfo>> pending;
    for (int i = 0; i < n; ++i) agents.push_back(job.agent(fmt::format("node{}", i), nodes(n, n), 1, i == 9 ? 5 : i));
    for (auto& a : agents) pending.push_back(joinAsync(*a));
    for (auto& f : pending) CHECK(errorOf(f).find("node rank 5 is claimed by two agents") != std::string::npos);
  }
}

TEST_CASE("large rounds: should the last joiner die before it publishes, the members assign themselves") {
  Job job;
  const int n = kFullMembershipNodes + 6;
  std::vector<std::unique_ptr<Rendezvous>> agents;
  std::vector<std::future<RoundInfo>> pending;
  for (int i = 0; i + 1 < n; ++i) {
    agents.push_back(job.agent(fmt::format("node{}", i), nodes(n, n, 30s, 60s)));
    pending.push_back(joinAsync(*agents.back()));
  }
  // Once the n-1 agents joined, a last joiner joins and closes the round as an agent does, then "dies": it never
  // publishes the layout or the assignments.
  std::vector<std::string> joined;
  for (int i = 0; i + 1 < n; ++i) joined.push_back(fmt::format("r0/node/{}", i));
  REQUIRE(job.store()->wait(joined, 30s));
  auto& store = *job.store();
  REQUIRE(store.add("r0/count", 1) == n);
  NodeInfo dead;
  dead.host = "dead.example";
  dead.hostname = "dead";
  store.set(fmt::format("r0/node/{}", n - 1), dead.toJson());
  store.append("r0/records", fmt::format("{} 1 -1\n", n - 1));
  store.compareSet("r0/closed", "", std::to_string(n));
  std::vector<int> seenRank(n, 0);
  for (auto& f : pending) {
    auto r = f.get();  // after the layout wait (10 s), from the layout they compute themselves
    CHECK(r.numNodes == n);
    CHECK(r.worldSize == n);
    CHECK(r.rankOffset == r.nodeRank);
    ++seenRank[static_cast<size_t>(r.nodeRank)];
  }
  CHECK(seenRank[static_cast<size_t>(n - 1)] == 0);  // the dead joiner's rank (join order: last)
  CHECK(std::count(seenRank.begin(), seenRank.end(), 1) == n - 1);
}
