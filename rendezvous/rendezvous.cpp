#include "rendezvous/rendezvous.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <climits>
#include <iterator>
#include <numeric>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"

namespace dtrain::rendezvous {

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

std::string key(int round, std::string_view what) { return fmt::format("r{}/{}", round, what); }

// While fewer than minNodes joined we re-check the join counter at this pace; once the round can close
// we wait on the `closed` key itself, which wakes us the moment anyone closes it.
constexpr Millis kQuorumPoll{100};
// While waiting for a round to open, we look whether the job ended this often.
constexpr Millis kEndedPoll{1000};
// How long members wait for the last joiner to publish the round's layout before computing it themselves.
constexpr Millis kLayoutWait{10000};

}  // namespace

std::string NodeInfo::toJson() const {
  return json{{"node_rank", requestedNodeRank}, {"nproc", nproc},  {"host", host},
              {"hostname", hostname},          {"pid", pid},      {"master_port", masterPort}}
      .dump();
}

NodeInfo NodeInfo::fromJson(const std::string& text) {
  auto j = json::parse(text, nullptr, false);
  DTRAIN_CHECK_AS(ProtocolError, j.is_object(), "rendezvous: malformed node record '{}'", text);
  NodeInfo n;
  n.requestedNodeRank = j.value("node_rank", -1);
  n.nproc = j.value("nproc", 1);
  n.host = j.value("host", "");
  n.hostname = j.value("hostname", "");
  n.pid = j.value("pid", 0);
  n.masterPort = j.value("master_port", 0);
  return n;
}

namespace {

// The one table of wire names; the order follows RoundEventType.
constexpr std::string_view kEventNames[] = {"failed", "node_lost", "membership", "shutdown", "done"};

}  // namespace

std::string_view roundEventName(RoundEventType type) { return kEventNames[static_cast<size_t>(type)]; }

std::optional<RoundEventType> parseRoundEventType(std::string_view name) {
  for (size_t i = 0; i < std::size(kEventNames); ++i)
    if (kEventNames[i] == name) return static_cast<RoundEventType>(i);
  return std::nullopt;
}

std::string RoundEvent::toJson() const {
  return json{{"type", roundEventName(type)}, {"message", message}, {"exit_code", exitCode}, {"report", report}}
      .dump();
}

RoundEvent RoundEvent::fromJson(const std::string& text) {
  auto j = json::parse(text, nullptr, false);
  DTRAIN_CHECK_AS(ProtocolError, j.is_object(), "rendezvous: malformed round event '{}'", text);
  auto type = parseRoundEventType(j.value("type", ""));
  DTRAIN_CHECK_AS(ProtocolError, type.has_value(), "rendezvous: round event of unknown type in '{}'", text);
  RoundEvent e;
  e.type = *type;
  e.message = j.value("message", "");
  e.exitCode = j.value("exit_code", 0);
  e.report = j.value("report", "");
  return e;
}

Rendezvous::Rendezvous(StorePtr store, RendezvousOptions options, NodeInfo self)
    : store_(std::move(store)), options_(std::move(options)), self_(std::move(self)) {}

int Rendezvous::currentRound() {
  auto v = store_->compareSet("round", "", "0");
  auto r = parse::toInt(v);
  DTRAIN_CHECK_AS(ProtocolError, r.has_value(), "rendezvous: malformed round counter '{}'", v);
  return static_cast<int>(*r);
}

RoundInfo Rendezvous::join() {
  Deadline deadline(options_.joinTimeout);
  if (!options_.jobFingerprint.empty()) {
    auto first = store_->compareSet("job", "", options_.jobFingerprint);
    auto idOf = [](std::string_view fp) { return fp.substr(0, fp.find(' ')); };
    if (idOf(first) != idOf(options_.jobFingerprint))
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {}: another job already uses this run id on this store (job {}); this is job {}. "
                   "Give each job its own --rdzv-id",
                   options_.endpoint, first, options_.jobFingerprint);
  }
  // After the fingerprint: another job is told that the id is another job's; the same job that its run ended.
  throwIfEnded();
  for (;;) {
    int round = currentRound();
    auto roundEvent = store_->tryGet(key(round, "event"));
    if (roundEvent && RoundEvent::fromJson(*roundEvent).type == RoundEventType::kDone)
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {}: this run id already completed a job on this store; use a new --rdzv-id",
                   options_.endpoint);
    if (auto info = tryJoinRound(round, deadline)) return *info;
    // We missed round `round` (it closed without us). If it has room, ask its members to re-form so we can
    // join; either way wait for the next round to open.
    auto closed = store_->tryGet(key(round, "closed"));
    int members = closed ? static_cast<int>(parse::toInt(*closed).value_or(0)) : 0;
    if (members < options_.maxNodes) {
      RoundEvent e{RoundEventType::kMembership,
                   fmt::format("node {} ({}) asks to join", self_.hostname, self_.host), 0, ""};
      store_->compareSet(key(round, "event"), "", e.toJson());
    }
    // A job that ends while we wait is reported within a slice, not after the whole timeout.
    bool opened = false;
    while (!opened && !deadline.expired()) {
      opened = store_->wait({key(round + 1, "open")}, std::min(kEndedPoll, deadline.remaining()));
      if (!opened) throwIfEnded();
    }
    if (!opened) {
      auto event = store_->tryGet(key(round, "event"));
      if (event)
        DTRAIN_THROW(RendezvousError,
                     "rendezvous at {} timed out after {} s: round {} of this run id ended ({}: {}) and its {} "
                     "node(s) opened no new round (were they killed? a job whose agents all died records no "
                     "outcome); use a new --rdzv-id",
                     options_.endpoint, options_.joinTimeout.count() / 1000, round,
                     roundEventName(RoundEvent::fromJson(*event).type), RoundEvent::fromJson(*event).message,
                     members);
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {} timed out after {} s: round {} is running with {} node(s) and no new "
                   "round opened for this node",
                   options_.endpoint, options_.joinTimeout.count() / 1000, round, members);
    }
  }
}

void Rendezvous::throwIfEnded() {
  auto ended = store_->tryGet("ended");
  if (!ended) return;
  auto outcome = RoundEvent::fromJson(*ended);
  if (outcome.type == RoundEventType::kDone)
    DTRAIN_THROW(RendezvousError,
                 "rendezvous at {}: this run id already completed a job on this store; use a new --rdzv-id",
                 options_.endpoint);
  DTRAIN_THROW(RendezvousError,
               "rendezvous at {}: the job that used this run id on this store already ended ({}, exit code {}: {}); "
               "use a new --rdzv-id",
               options_.endpoint, roundEventName(outcome.type), outcome.exitCode, outcome.message);
}

void Rendezvous::recordEnd(const RoundEvent& outcome) { store_->compareSet("ended", "", outcome.toJson()); }

std::optional<RoundInfo> Rendezvous::tryJoinRound(int round, const Deadline& deadline) {
  if (store_->check({key(round, "closed")})) return std::nullopt;
  int index = static_cast<int>(store_->add(key(round, "count"), 1)) - 1;
  store_->set(key(round, fmt::format("node/{}", index)), self_.toJson());
  // The compact copy the layout is computed from in one read (see computeLayout).
  store_->append(key(round, "records"), fmt::format("{} {} {}\n", index, self_.nproc, self_.requestedNodeRank));
  if (index + 1 == options_.maxNodes) store_->compareSet(key(round, "closed"), "", std::to_string(index + 1));

  // Wait for the round to close. With min < max, the first agent to see quorum for `lastCall` closes it.
  std::optional<Clock::time_point> quorumSince;
  while (!store_->check({key(round, "closed")})) {
    if (deadline.expired()) {
      int joined = static_cast<int>(store_->add(key(round, "count"), 0));
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {} timed out after {} s: {} of {} node(s) joined (need {}); start the "
                   "missing agents with the same --rdzv-endpoint and --rdzv-id, or lower --nnodes",
                   options_.endpoint, options_.joinTimeout.count() / 1000, joined,
                   options_.maxNodes, options_.minNodes);
    }
    int joined = static_cast<int>(store_->add(key(round, "count"), 0));
    Millis slice = kQuorumPoll;
    if (joined >= options_.minNodes && options_.minNodes < options_.maxNodes) {
      if (!quorumSince) quorumSince = Clock::now();
      auto waited = std::chrono::duration_cast<Millis>(Clock::now() - *quorumSince);
      if (waited >= options_.lastCall) {
        store_->compareSet(key(round, "closed"), "", std::to_string(joined));
        continue;
      }
      slice = options_.lastCall - waited;
    } else if (options_.minNodes == options_.maxNodes) {
      slice = deadline.remaining();  // only `closed` can end this wait: block on it
    }
    store_->wait({key(round, "closed")}, std::min(slice, deadline.remaining()));
  }
  int members = static_cast<int>(parse::toInt(store_->get(key(round, "closed"), 10s)).value_or(0));
  if (index >= members) return std::nullopt;
  return assemble(round, members, index, deadline);
}

// The layout: "layout <numNodes> <worldSize>\n" then one "<join index> <nproc>\n" per node rank, in node-rank
// order; or "error <message>" when the members cannot form a group (two claim one node rank).
std::string Rendezvous::computeLayout(int round, int members) {
  struct Joined {
    int requestedNodeRank;
    int nproc;
    int index;
  };
  // One read of every joiner's compact record; a joiner whose append is still in flight is read from its
  // node record (set before the append, so the get returns at once or very soon).
  std::vector<std::optional<Joined>> byIndex(static_cast<size_t>(members));
  const std::string records = store_->tryGet(key(round, "records")).value_or("");
  size_t pos = 0;
  while (pos < records.size()) {
    auto eol = records.find('\n', pos);
    if (eol == std::string::npos) break;
    int index = -1, nproc = 0, requested = -1;
    if (std::sscanf(records.c_str() + pos, "%d %d %d", &index, &nproc, &requested) == 3 && index >= 0 &&
        index < members)
      byIndex[static_cast<size_t>(index)] = Joined{requested, nproc, index};
    pos = eol + 1;
  }
  std::vector<Joined> joined;
  joined.reserve(static_cast<size_t>(members));
  for (int i = 0; i < members; ++i) {
    if (!byIndex[static_cast<size_t>(i)]) {
      auto n = NodeInfo::fromJson(store_->get(key(round, fmt::format("node/{}", i)), 30s));
      byIndex[static_cast<size_t>(i)] = Joined{n.requestedNodeRank, n.nproc, i};
    }
    joined.push_back(*byIndex[static_cast<size_t>(i)]);
  }
  std::stable_sort(joined.begin(), joined.end(), [](const Joined& a, const Joined& b) {
    int ra = a.requestedNodeRank < 0 ? INT_MAX : a.requestedNodeRank;
    int rb = b.requestedNodeRank < 0 ? INT_MAX : b.requestedNodeRank;
    return ra != rb ? ra < rb : a.index < b.index;
  });
  for (size_t i = 1; i < joined.size(); ++i) {
    if (joined[i - 1].requestedNodeRank < 0 || joined[i - 1].requestedNodeRank != joined[i].requestedNodeRank) continue;
    auto a = NodeInfo::fromJson(store_->get(key(round, fmt::format("node/{}", joined[i - 1].index)), 30s));
    auto b = NodeInfo::fromJson(store_->get(key(round, fmt::format("node/{}", joined[i].index)), 30s));
    return fmt::format("error node rank {} is claimed by two agents ({} pid {} and {} pid {}); give each node "
                       "its own --node-rank",
                       a.requestedNodeRank, a.hostname, a.pid, b.hostname, b.pid);
  }
  int world = 0;
  std::string body;
  body.reserve(static_cast<size_t>(members) * 12);
  for (const auto& j : joined) {
    world += j.nproc;
    body += fmt::format("{} {}\n", j.index, j.nproc);
  }
  return fmt::format("layout {} {}\n", members, world) + body;
}

RoundInfo Rendezvous::assemble(int round, int members, int myIndex, const Deadline& deadline) {
  // The round's last joiner computes the layout once (O(N) reads) and everyone reads that one small key, so a
  // round of N agents costs O(N) store operations instead of N reads by each of N agents. Should the last
  // joiner die before it publishes, anyone computes it after kLayoutWait (the result is deterministic, so the
  // compareSet keeps whichever copy came first).
  const std::string layoutKey = key(round, "layout");
  if (myIndex == members - 1) store_->compareSet(layoutKey, "", computeLayout(round, members));
  if (!store_->wait({layoutKey}, std::min(kLayoutWait, deadline.remaining())))
    store_->compareSet(layoutKey, "", computeLayout(round, members));
  const std::string layout = store_->get(layoutKey, 10s);
  if (layout.rfind("error ", 0) == 0) DTRAIN_THROW(RendezvousError, "rendezvous: {}", layout.substr(6));

  RoundInfo info;
  info.round = round;
  info.restartCount = static_cast<int>(parse::toInt(store_->tryGet(key(round, "restarts")).value_or("0")).value_or(0));
  info.reformCount = static_cast<int>(parse::toInt(store_->tryGet(key(round, "reforms")).value_or("0")).value_or(0));
  info.numNodes = members;
  info.nodeRank = -1;
  std::vector<int> joinIndex;  // by node rank
  parseLayout(layout, members, info, joinIndex, myIndex);
  DTRAIN_CHECK_AS(ProtocolError, info.nodeRank >= 0, "rendezvous: round {}'s layout has no entry for join index {}",
                  round, myIndex);
  // Full records of every member in small rounds; in large ones those of node 0 (MASTER_ADDR), this node and
  // the members it watches (their hostnames name a lost node), so no agent reads O(N) records.
  auto fill = [&](int nodeRank) {
    auto& m = info.members[static_cast<size_t>(nodeRank)];
    if (!m.info.host.empty() || !m.info.hostname.empty()) return;
    m.info = nodeRank == info.nodeRank
                 ? self_
                 : NodeInfo::fromJson(store_->get(key(round, fmt::format("node/{}", joinIndex[static_cast<size_t>(nodeRank)])), 30s));
  };
  if (members <= kFullMembershipNodes) {
    for (int r = 0; r < members; ++r) fill(r);
  } else {
    fill(0);
    fill(info.nodeRank);
    for (int r : watchedMembers(info)) fill(r);
  }
  info.masterAddr = info.members.front().info.host;
  info.masterPort = info.members.front().info.masterPort;
  seen_.assign(static_cast<size_t>(members), {std::string(), Clock::now()});
  seenRound_ = round;
  return info;
}

void Rendezvous::parseLayout(const std::string& layout, int members, RoundInfo& info, std::vector<int>& joinIndex,
                             int myIndex) {
  auto bad = [&] {
    DTRAIN_THROW(ProtocolError, "rendezvous: malformed layout of round {}: '{}'", info.round,
                 layout.substr(0, 200));
  };
  const char* p = layout.data();
  const char* end = p + layout.size();
  auto nextInt = [&](int& out) {
    while (p < end && (*p == ' ' || *p == '\n')) ++p;
    auto [q, ec] = std::from_chars(p, end, out);
    if (ec != std::errc()) bad();
    p = q;
  };
  if (layout.rfind("layout ", 0) != 0) bad();
  p += 7;
  int n = 0, world = 0;
  nextInt(n);
  nextInt(world);
  if (n != members) bad();
  info.members.resize(static_cast<size_t>(n));
  joinIndex.resize(static_cast<size_t>(n));
  int offset = 0;
  for (int r = 0; r < n; ++r) {
    int index = 0, nproc = 0;
    nextInt(index);
    nextInt(nproc);
    auto& m = info.members[static_cast<size_t>(r)];
    m.nodeRank = r;
    m.rankOffset = offset;
    m.info.nproc = nproc;
    joinIndex[static_cast<size_t>(r)] = index;
    if (index == myIndex) {
      info.nodeRank = r;
      info.rankOffset = offset;
    }
    offset += nproc;
  }
  if (offset != world) bad();
  info.worldSize = world;
}

std::vector<int> Rendezvous::watchedMembers(const RoundInfo& info) {
  std::vector<int> watched;
  if (info.numNodes <= kFullMembershipNodes) {
    for (int n = 0; n < info.numNodes; ++n)
      if (n != info.nodeRank) watched.push_back(n);
    return watched;
  }
  // A ring: each member watches the next kRingWatch node ranks. Any lost member is watched by its predecessor,
  // and if that one is lost too, by the predecessor's predecessor, and so on: while one member lives, some
  // member detects a loss, and any loss ends the round for everyone.
  for (int k = 1; k <= kRingWatch && k < info.numNodes; ++k) watched.push_back((info.nodeRank + k) % info.numNodes);
  return watched;
}

RoundEvent Rendezvous::endRound(int round, const RoundEvent& event) {
  auto current = store_->compareSet(key(round, "event"), "", event.toJson());
  return RoundEvent::fromJson(current);
}

std::optional<RoundEvent> Rendezvous::waitEvent(Store& store, int round, Millis timeout) {
  if (!store.wait({key(round, "event")}, timeout)) return std::nullopt;
  return RoundEvent::fromJson(store.get(key(round, "event"), 10s));
}

void Rendezvous::markFinished(const RoundInfo& info) {
  auto n = store_->add(key(info.round, "finished"), 1);
  if (n == info.numNodes) endRound(info.round, RoundEvent{RoundEventType::kDone, "all nodes finished", 0, ""});
}

void Rendezvous::advance(int round, bool restart) {
  auto count = [&](std::string_view what) {
    return static_cast<int>(parse::toInt(store_->tryGet(key(round, what)).value_or("0")).value_or(0));
  };
  int restarts = count("restarts") + (restart ? 1 : 0);
  int reforms = count("reforms") + (restart ? 0 : 1);
  // Every agent computes the same values, so the compareSets are idempotent and the order of agents is irrelevant.
  store_->compareSet(key(round + 1, "restarts"), "", std::to_string(restarts));
  store_->compareSet(key(round + 1, "reforms"), "", std::to_string(reforms));
  store_->compareSet("round", std::to_string(round), std::to_string(round + 1));
  store_->set(key(round + 1, "open"), "1");
}

void Rendezvous::acknowledgeEnd(const RoundInfo& info) {
  if (store_->add(key(info.round, "acks"), 1) == info.numNodes) store_->set(key(info.round, "all_acked"), "1");
}

bool Rendezvous::waitAcknowledged(const RoundInfo& info, Millis timeout) {
  return store_->wait({key(info.round, "all_acked")}, timeout);
}

void Rendezvous::heartbeat(const RoundInfo& info) {
  store_->set(key(info.round, fmt::format("hb/{}", info.nodeRank)), std::to_string(++beats_));
}

std::vector<double> Rendezvous::heartbeatAges(const RoundInfo& info) const {
  std::vector<double> ages(static_cast<size_t>(info.numNodes), -1.0);
  if (seenRound_ != info.round) return ages;
  auto now = Clock::now();
  if (info.nodeRank >= 0 && info.nodeRank < info.numNodes) ages[static_cast<size_t>(info.nodeRank)] = 0.0;
  for (int n : watchedMembers(info))
    if (n < static_cast<int>(seen_.size()))
      ages[static_cast<size_t>(n)] = std::chrono::duration<double>(now - seen_[static_cast<size_t>(n)].second).count();
  return ages;
}

std::vector<int> Rendezvous::silentMembers(const RoundInfo& info, Millis timeout) {
  std::vector<int> silent;
  if (seenRound_ != info.round) {
    seen_.assign(info.numNodes, {std::string(), Clock::now()});
    seenRound_ = info.round;
  }
  auto now = Clock::now();
  for (int n : watchedMembers(info)) {
    auto v = store_->tryGet(key(info.round, fmt::format("hb/{}", n))).value_or("");
    if (v != seen_[n].first) {
      seen_[n] = {v, now};
    } else if (now - seen_[n].second > timeout) {
      silent.push_back(n);
    }
  }
  return silent;
}

}  // namespace dtrain::rendezvous
