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

// While fewer than minNodes joined an elastic round, joiners block on its `quorum` key (set by the minNodes-th
// joiner); this bounds the wait only in case that joiner died between joining and setting it. Once the round
// can close we wait on the `closed` key itself, which wakes us the moment anyone closes it.
constexpr Millis kQuorumPoll{1000};
// While waiting for a round to open, we look whether the job ended this often.
constexpr Millis kEndedPoll{1000};
// How long members wait for the last joiner to publish the round's layout before computing it themselves.
constexpr Millis kLayoutWait{10000};

// Large rounds: the kRingWatch node ranks after `nodeRank`, modulo numNodes.
std::vector<int> ringWatched(int nodeRank, int numNodes) {
  std::vector<int> watched;
  for (int k = 1; k <= kRingWatch && k < numNodes; ++k) watched.push_back((nodeRank + k) % numNodes);
  return watched;
}

// One node of a parsed layout, by node rank.
struct Placed {
  int joinIndex = 0;
  int rankOffset = 0;
  int nproc = 0;
};

}  // namespace

const Member* RoundInfo::member(int rank) const {
  auto it = std::lower_bound(members.begin(), members.end(), rank,
                             [](const Member& m, int r) { return m.nodeRank < r; });
  return it != members.end() && it->nodeRank == rank ? &*it : nullptr;
}

const Member& RoundInfo::self() const {
  const Member* m = member(nodeRank);
  DTRAIN_CHECK_AS(ProtocolError, m != nullptr, "rendezvous: round {} holds no entry for this node (node rank {})",
                  round, nodeRank);
  return *m;
}

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
  const bool elastic = options_.minNodes < options_.maxNodes;
  if (elastic && index + 1 == options_.minNodes) store_->set(key(round, "quorum"), std::to_string(index + 1));
  if (index + 1 == options_.maxNodes) store_->compareSet(key(round, "closed"), "", std::to_string(index + 1));

  // Wait for the round to close. With min < max, the first agent to see quorum for `lastCall` closes it.
  std::optional<Clock::time_point> quorumSince;
  std::optional<std::string> closed;
  while (!(closed = store_->tryGet(key(round, "closed")))) {
    if (deadline.expired()) {
      int joined = static_cast<int>(store_->add(key(round, "count"), 0));
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {} timed out after {} s: {} of {} node(s) joined (need {}); start the "
                   "missing agents with the same --rdzv-endpoint and --rdzv-id, or lower --nnodes",
                   options_.endpoint, options_.joinTimeout.count() / 1000, joined,
                   options_.maxNodes, options_.minNodes);
    }
    if (!elastic) {
      // Only `closed` can end this wait: block on it and read it in one round trip (no polling).
      try {
        closed = store_->get(key(round, "closed"), deadline.remaining());
      } catch (const TimeoutError&) {
        // the deadline check above reports it
      }
      continue;
    }
    int joined = static_cast<int>(store_->add(key(round, "count"), 0));
    if (joined < options_.minNodes) {
      // Woken by the minNodes-th joiner's `quorum` key (or, should it have died, by the fallback slice).
      store_->wait({key(round, "quorum")}, std::min(kQuorumPoll, deadline.remaining()));
      continue;
    }
    if (!quorumSince) quorumSince = Clock::now();
    auto waited = std::chrono::duration_cast<Millis>(Clock::now() - *quorumSince);
    if (waited >= options_.lastCall) {
      store_->compareSet(key(round, "closed"), "", std::to_string(joined));
      continue;
    }
    store_->wait({key(round, "closed")}, std::min(options_.lastCall - waited, deadline.remaining()));
  }
  int members = static_cast<int>(parse::toInt(*closed).value_or(0));
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

namespace {

// Parses a layout (see computeLayout) of `members` nodes into one entry per node rank; throws ProtocolError.
std::vector<Placed> parseLayout(const std::string& layout, int members, int round, int& world) {
  auto bad = [&] {
    DTRAIN_THROW(ProtocolError, "rendezvous: malformed layout of round {}: '{}'", round, layout.substr(0, 200));
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
  int n = 0;
  nextInt(n);
  nextInt(world);
  if (n != members) bad();
  std::vector<Placed> placed(static_cast<size_t>(n));
  int offset = 0;
  for (auto& node : placed) {
    nextInt(node.joinIndex);
    nextInt(node.nproc);
    if (node.joinIndex < 0 || node.joinIndex >= n || node.nproc < 1) bad();
    node.rankOffset = offset;
    offset += node.nproc;
  }
  if (offset != world) bad();
  return placed;
}

// Every joiner's assignment in a large round, indexed by join index (format in rendezvous.h: r<R>/assign/<i>);
// an error layout gives every joiner that error.
std::vector<std::string> assignments(const std::string& layout, int members, int round) {
  if (layout.rfind("error ", 0) == 0) return std::vector<std::string>(static_cast<size_t>(members), layout);
  int world = 0;
  auto placed = parseLayout(layout, members, round, world);
  std::vector<std::string> out(static_cast<size_t>(members));
  auto line = [&](std::string& text, int r) {
    const auto& p = placed[static_cast<size_t>(r)];
    text += fmt::format("{} {} {} {}\n", r, p.joinIndex, p.rankOffset, p.nproc);
  };
  for (int r = 0; r < members; ++r) {
    std::string text = fmt::format("assign {} {}\n", members, world);
    line(text, r);
    if (r != 0) line(text, 0);
    for (int w : ringWatched(r, members))
      if (w != 0) line(text, w);
    out[static_cast<size_t>(placed[static_cast<size_t>(r)].joinIndex)] = std::move(text);
  }
  return out;
}

}  // namespace

std::string Rendezvous::publishLayout(int round, int members) {
  // Deterministic, so a second writer (a member that gave up waiting) writes the same thing.
  std::string layout = store_->compareSet(key(round, "layout"), "", computeLayout(round, members));
  if (members > kFullMembershipNodes) {
    auto texts = assignments(layout, members, round);
    std::vector<std::pair<std::string, std::string>> entries;
    entries.reserve(texts.size());
    for (size_t i = 0; i < texts.size(); ++i)
      entries.emplace_back(key(round, fmt::format("assign/{}", i)), std::move(texts[i]));
    store_->multiSet(entries);  // pipelined: one round trip per few hundred assignments
  }
  return layout;
}

RoundInfo Rendezvous::assemble(int round, int members, int myIndex, const Deadline& deadline) {
  if (members > kFullMembershipNodes) return assembleLarge(round, members, myIndex, deadline);
  // The round's last joiner computes the layout once (O(N) reads) and everyone reads that one small key, so a
  // round of N agents costs O(N) store operations instead of N reads by each of N agents. Should the last
  // joiner die before it publishes, anyone computes it after kLayoutWait (the result is deterministic, so the
  // compareSet keeps whichever copy came first).
  const std::string layoutKey = key(round, "layout");
  std::string layout;
  if (myIndex == members - 1) {
    layout = publishLayout(round, members);
  } else {
    try {
      layout = store_->get(layoutKey, std::min(kLayoutWait, deadline.remaining()));  // waits and reads
    } catch (const TimeoutError&) {
      layout = publishLayout(round, members);
    }
  }
  if (layout.rfind("error ", 0) == 0) DTRAIN_THROW(RendezvousError, "rendezvous: {}", layout.substr(6));

  RoundInfo info;
  info.round = round;
  info.numNodes = members;
  info.nodeRank = -1;
  auto placed = parseLayout(layout, members, round, info.worldSize);
  // Every member's full record, the restart counts with them: one pipelined batch.
  std::vector<std::string> keys{key(round, "restarts"), key(round, "reforms")};
  for (const auto& p : placed) keys.push_back(key(round, fmt::format("node/{}", p.joinIndex)));
  auto values = store_->multiGet(keys);
  auto count = [&](size_t i) { return static_cast<int>(parse::toInt(values[i].value_or("0")).value_or(0)); };
  info.restartCount = count(0);
  info.reformCount = count(1);
  info.members.resize(placed.size());
  for (int r = 0; r < members; ++r) {
    const auto& p = placed[static_cast<size_t>(r)];
    auto& m = info.members[static_cast<size_t>(r)];
    m.nodeRank = r;
    m.rankOffset = p.rankOffset;
    if (p.joinIndex == myIndex) {
      info.nodeRank = r;
      info.rankOffset = p.rankOffset;
      m.info = self_;
      continue;
    }
    // A record whose set is still in flight (it precedes the joiner's append, so it is there or very soon).
    auto& record = values[2 + static_cast<size_t>(r)];
    m.info = NodeInfo::fromJson(record ? *record : store_->get(key(round, fmt::format("node/{}", p.joinIndex)), 30s));
  }
  DTRAIN_CHECK_AS(ProtocolError, info.nodeRank >= 0, "rendezvous: round {}'s layout has no entry for join index {}",
                  round, myIndex);
  info.masterAddr = info.members.front().info.host;
  info.masterPort = info.members.front().info.masterPort;
  resetSeen(info);
  return info;
}

RoundInfo Rendezvous::assembleLarge(int round, int members, int myIndex, const Deadline& deadline) {
  // Each member reads only its own assignment (written by the last joiner with the layout): O(1) per agent.
  // Should the last joiner die before it publishes, a member computes the layout itself after kLayoutWait and
  // takes its own assignment from it.
  const std::string assignKey = key(round, fmt::format("assign/{}", myIndex));
  if (myIndex == members - 1) publishLayout(round, members);
  std::optional<std::string> mine;
  try {
    mine = store_->get(assignKey, std::min(kLayoutWait, deadline.remaining()));  // waits and reads: one round trip
  } catch (const TimeoutError&) {
    auto layout = store_->compareSet(key(round, "layout"), "", computeLayout(round, members));
    mine = assignments(layout, members, round)[static_cast<size_t>(myIndex)];
  }
  const std::string text = std::move(*mine);
  if (text.rfind("error ", 0) == 0) DTRAIN_THROW(RendezvousError, "rendezvous: {}", text.substr(6));

  RoundInfo info;
  info.round = round;
  info.numNodes = members;
  auto bad = [&] {
    DTRAIN_THROW(ProtocolError, "rendezvous: malformed assignment of join index {} in round {}: '{}'", myIndex,
                 round, text.substr(0, 200));
  };
  int n = 0;
  int used = 0;
  if (std::sscanf(text.c_str(), "assign %d %d\n%n", &n, &info.worldSize, &used) != 2 || n != members || used <= 0)
    bad();
  struct Known {
    int nodeRank, joinIndex, rankOffset, nproc;
  };
  std::vector<Known> known;  // this node first, then node 0 and the watched nodes
  for (size_t pos = static_cast<size_t>(used); pos < text.size();) {
    Known k{};
    if (std::sscanf(text.c_str() + pos, "%d %d %d %d", &k.nodeRank, &k.joinIndex, &k.rankOffset, &k.nproc) != 4 ||
        k.nodeRank < 0 || k.nodeRank >= members || k.joinIndex < 0 || k.joinIndex >= members || k.nproc < 1)
      bad();
    known.push_back(k);
    auto eol = text.find('\n', pos);
    pos = eol == std::string::npos ? text.size() : eol + 1;
  }
  if (known.empty() || known.front().joinIndex != myIndex) bad();
  info.nodeRank = known.front().nodeRank;
  info.rankOffset = known.front().rankOffset;
  std::sort(known.begin(), known.end(), [](const Known& a, const Known& b) { return a.nodeRank < b.nodeRank; });
  if (known.front().nodeRank != 0) bad();

  // The other known members' records and the restart counts: one pipelined batch.
  std::vector<std::string> keys{key(round, "restarts"), key(round, "reforms")};
  for (const auto& k : known)
    if (k.nodeRank != info.nodeRank) keys.push_back(key(round, fmt::format("node/{}", k.joinIndex)));
  auto values = store_->multiGet(keys);
  info.restartCount = static_cast<int>(parse::toInt(values[0].value_or("0")).value_or(0));
  info.reformCount = static_cast<int>(parse::toInt(values[1].value_or("0")).value_or(0));
  size_t next = 2;
  for (const auto& k : known) {
    Member m;
    m.nodeRank = k.nodeRank;
    m.rankOffset = k.rankOffset;
    if (k.nodeRank == info.nodeRank) {
      m.info = self_;
    } else {
      auto& record = values[next++];
      m.info = NodeInfo::fromJson(record ? *record : store_->get(key(round, fmt::format("node/{}", k.joinIndex)), 30s));
    }
    m.info.nproc = k.nproc;
    info.members.push_back(std::move(m));
  }
  info.masterAddr = info.members.front().info.host;
  info.masterPort = info.members.front().info.masterPort;
  resetSeen(info);
  return info;
}

std::vector<int> Rendezvous::watchedMembers(const RoundInfo& info) {
  if (info.numNodes <= kFullMembershipNodes) {
    std::vector<int> watched;
    for (int n = 0; n < info.numNodes; ++n)
      if (n != info.nodeRank) watched.push_back(n);
    return watched;
  }
  // A ring: each member watches the next kRingWatch node ranks. Any lost member is watched by its predecessor,
  // and if that one is lost too, by the predecessor's predecessor, and so on: while one member lives, some
  // member detects a loss, and any loss ends the round for everyone.
  return ringWatched(info.nodeRank, info.numNodes);
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

void Rendezvous::resetSeen(const RoundInfo& info) {
  seen_.clear();
  auto now = Clock::now();
  for (int n : watchedMembers(info)) seen_.push_back(Seen{n, std::string(), now});
  seenRound_ = info.round;
}

std::vector<double> Rendezvous::heartbeatAges(const RoundInfo& info) const {
  std::vector<double> ages(static_cast<size_t>(info.numNodes), -1.0);
  if (seenRound_ != info.round) return ages;
  auto now = Clock::now();
  if (info.nodeRank >= 0 && info.nodeRank < info.numNodes) ages[static_cast<size_t>(info.nodeRank)] = 0.0;
  for (const auto& s : seen_)
    if (s.nodeRank < info.numNodes)
      ages[static_cast<size_t>(s.nodeRank)] = std::chrono::duration<double>(now - s.changed).count();
  return ages;
}

std::vector<int> Rendezvous::silentMembers(const RoundInfo& info, Millis timeout) {
  if (seenRound_ != info.round) resetSeen(info);
  // All watched counters in one pipelined batch: one round trip per beat, whatever the number watched.
  std::vector<std::string> keys;
  keys.reserve(seen_.size());
  for (const auto& s : seen_) keys.push_back(key(info.round, fmt::format("hb/{}", s.nodeRank)));
  auto values = store_->multiGet(keys);
  std::vector<int> silent;
  auto now = Clock::now();
  for (size_t i = 0; i < seen_.size(); ++i) {
    auto& s = seen_[i];
    auto v = values[i].value_or("");
    if (v != s.value) {
      s.value = std::move(v);
      s.changed = now;
    } else if (now - s.changed > timeout) {
      silent.push_back(s.nodeRank);
    }
  }
  return silent;
}

}  // namespace dtrain::rendezvous
