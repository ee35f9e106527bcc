#include "rendezvous/rendezvous.h"

#include <nlohmann/json.hpp>

#include <algorithm>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "rendezvous/rendezvous_keys.h"
#include "rendezvous/round_layout.h"

namespace dtrain::rendezvous {

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

using detail::kClosingRetry;
using detail::kClosingSteal;
using detail::kEndedPoll;
using detail::key;
using detail::kQuorumPoll;

// How long members wait for the last joiner to publish the round's layout before computing it themselves.
constexpr Millis kLayoutWait{10000};

using layout::ringWatched;

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

int Rendezvous::currentRound() { return parseRound(store_->compareSet("round", "", "0")); }

int Rendezvous::parseRound(const std::string& value) {
  auto r = parse::toInt(value);
  DTRAIN_CHECK_AS(ProtocolError, r.has_value(), "rendezvous: malformed round counter '{}'", value);
  return static_cast<int>(*r);
}

RoundInfo Rendezvous::join() {
  Deadline deadline(options_.joinTimeout);
  // One round trip: the job's fingerprint, whether the run id already ended, and the current round.
  std::vector<StoreOp> ops;
  const bool fingerprinted = !options_.jobFingerprint.empty();
  if (fingerprinted) ops.push_back(StoreOp::compareSet("job", "", options_.jobFingerprint));
  ops.push_back(StoreOp::tryGet("ended"));
  const bool agreeing = !options_.agreedEnv.empty();
  if (agreeing) {
    ops.push_back(StoreOp::tryGet("agreed_env"));  // absent: this agent is the job's first
    ops.push_back(StoreOp::compareSet("agreed_env", "", options_.agreedEnv));
  }
  ops.push_back(StoreOp::compareSet("round", "", "0"));
  auto first = store_->batch(ops);
  if (fingerprinted) throwIfAnotherJob(first[0].value.value_or(""), first[1].value);
  // After the fingerprint: another job is told that the id is another job's; the same job that its run ended.
  throwIfEnded(first[fingerprinted ? 1 : 0].value);
  if (agreeing) {
    if (!first[first.size() - 3].value && first[first.size() - 2].value == options_.agreedEnv && options_.onFirstAgent)
      options_.onFirstAgent();
    throwIfEnvDisagrees(first[first.size() - 2].value.value_or(""));
  }
  int round = parseRound(first.back().value.value_or(""));
  for (;;) {
    if (auto info = tryJoinRound(round, deadline)) return *info;
    round = waitForNextRound(round, deadline);
  }
}

void Rendezvous::throwIfEnded(const std::optional<std::string>& ended) {
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

void Rendezvous::throwJoinTimeout(int round) {
  auto got = store_->batch({StoreOp::add(key(round, "count"), 0), StoreOp::tryGet("refused/count")});
  int joined = static_cast<int>(got[0].number);
  const std::string refusedNote = refusedCountNote(got[1].value);
  // Elastic with node counts the job cannot run: the joiners may be MIN or more and still form no round (2
  // pipeline stages, one node left). Name the count that would, not MIN, and do not suggest lowering --nnodes.
  const int need = joined >= options_.minNodes ? options_.usableFrom(joined + 1) : options_.usableFrom(options_.minNodes);
  if (need > options_.minNodes || (need == 0 && joined >= options_.minNodes))
    DTRAIN_THROW(RendezvousError,
                 "rendezvous at {} timed out after {} s: {} of {} node(s) joined (need {}: this job cannot run on {} "
                 "node(s), see the launch's warning){}; start the missing agents with the same --rdzv-endpoint and "
                 "--rdzv-id",
                 options_.endpoint, options_.joinTimeout.count() / 1000, joined, options_.maxNodes,
                 need > 0 ? std::to_string(need) : std::string("a usable count"), joined, refusedNote);
  DTRAIN_THROW(RendezvousError,
               "rendezvous at {} timed out after {} s: {} of {} node(s) joined (need {}){}; start the "
               "missing agents with the same --rdzv-endpoint and --rdzv-id, or lower --nnodes",
               options_.endpoint, options_.joinTimeout.count() / 1000, joined, options_.maxNodes, options_.minNodes,
               refusedNote);
}

// Round trips per joiner (scripts/bench/rdzv_scale counts them): join()'s first batch, then here one batch for
// the round's event and our join index, and one that publishes our record, closes the round if we are the last
// joiner, and (min == max) waits for `closed` and then reads our layout/assignment in the same pipelined write.
// The last joiner instead reads the records (one batch) and writes the layout and every assignment (one batch,
// one round trip per few hundred assignments).
std::optional<RoundInfo> Rendezvous::tryJoinRound(int round, const Deadline& deadline) {
  auto joined = store_->batch({StoreOp::tryGet(key(round, "event")), StoreOp::add(key(round, "count"), 1)});
  if (joined[0].value && RoundEvent::fromJson(*joined[0].value).type == RoundEventType::kDone)
    DTRAIN_THROW(RendezvousError,
                 "rendezvous at {}: this run id already completed a job on this store; use a new --rdzv-id",
                 options_.endpoint);
  // Joining a round that already closed only raises its counter: our index is then >= its member count.
  const int index = static_cast<int>(joined[1].number) - 1;
  const bool elastic = options_.minNodes < options_.maxNodes;
  const bool last = index + 1 == options_.maxNodes;
  const bool large = options_.maxNodes > kFullMembershipNodes;
  std::vector<StoreOp> ops{StoreOp::set(key(round, fmt::format("node/{}", index)), self_.toJson()),
                           StoreOp::append(key(round, "records"), layout::recordLine(index, self_))};
  if (!elastic && last) {
    // The last joiner of a min == max round reads every joiner's record in the same write as its own, then
    // writes the layout, every assignment and `closed` in one batch, `closed` last: the others, parked on
    // `closed` and then on their place, are woken once with both answers ready.
    for (const char* what : {"records", "restarts", "reforms"}) ops.push_back(StoreOp::tryGet(key(round, what)));
    auto inputs = store_->batch(ops);
    inputs.erase(inputs.begin(), inputs.begin() + 2);
    const int members = options_.maxNodes;
    auto text = publishLayout(round, members, index, computeLayout(round, members, &inputs), /*close=*/true);
    if (text.rfind("error ", 0) == 0) DTRAIN_THROW(RendezvousError, "rendezvous: {}", text.substr(6));
    return large ? assembleLarge(round, members, index, text) : assemble(round, members, index, text);
  }
  if (elastic && index + 1 == options_.minNodes) ops.push_back(StoreOp::set(key(round, "quorum"), std::to_string(index + 1)));
  // The max-th joiner closes the round; an elastic one with the largest usable count (max itself, unless the
  // job cannot run on max nodes: the joiners beyond that count are then spares).
  const int closeWith = elastic ? options_.usableMembers(index + 1) : index + 1;
  if (last && closeWith > 0) ops.push_back(StoreOp::compareSet(key(round, "closed"), "", std::to_string(closeWith)));
  // min == max: only `closed` ends the wait, and then the round has max members, so a joiner with a lower index
  // knows which key holds its place before the round closes: it blocks on both in this one write (the store
  // answers the second get once the first is answered).
  const bool prefetch = !elastic && !last && index < options_.maxNodes;
  if (!elastic && !last) ops.push_back(StoreOp::get(key(round, "closed"), deadline.remaining()));
  if (prefetch) ops.push_back(StoreOp::get(placementKey(round, index, large), std::min(kLayoutWait, deadline.remaining())));
  auto res = store_->batch(ops);

  std::optional<detail::ArmedStop> armed;  // elastic: a stop while the round forms is deferred (see below)
  std::optional<std::string> closed;
  std::optional<std::string> placement;  // prefetched layout / assignment; nullopt: not read, or not published in time
  if (last && closeWith > 0) {
    closed = res[ops.size() - 1].value;
  } else if (!elastic) {
    closed = res[ops.size() - (prefetch ? 2 : 1)].value;
    if (!closed) throwJoinTimeout(round);
    if (prefetch) placement = res.back().value;
  } else {
    // Elastic: with min < max, the first agent to see quorum for `lastCall` closes the round, with the largest
    // usable count of the joiners (the rest are spares); while they give none, it keeps waiting for more. A stop
    // signal meanwhile is deferred (armStop) and seen within kEndedPoll: the latest joiner withdraws from the
    // round (withdrawBeforeClose); any other stays until the round closes, then leaves it at once (below).
    armed.emplace(options_);
    log::info("rendezvous: joined round {} as its joiner {} (--nnodes {}:{})", round, index + 1, options_.minNodes,
              options_.maxNodes);
    const Millis slice = options_.stopPending ? kEndedPoll : Millis::max();
    Clock::time_point quorumSince{};  // when this agent first saw minNodes joined (valid while `quorum`)
    bool quorum = false;
    bool waitingLogged = false;
    while (!(closed = store_->tryGet(key(round, "closed")))) {
      if (const int sig = options_.pendingStop(); sig && withdrawBeforeClose(round, index)) {
        throw SpareStopped(fmt::format("rendezvous at {}: stopped by signal {} while joining round {}, before it "
                                       "closed; this node withdrew from it",
                                       options_.endpoint, sig, round),
                           sig);
      }
      if (deadline.expired()) throwJoinTimeout(round);
      int count = static_cast<int>(store_->add(key(round, "count"), 0));
      if (count < options_.minNodes) {
        // Woken by the minNodes-th joiner's `quorum` key (or, should it have died, by the fallback slice).
        quorum = false;  // a joiner withdrew below quorum: the last call starts again at quorum
        store_->wait({key(round, "quorum")}, std::min(kQuorumPoll, deadline.remaining()));
        continue;
      }
      if (!quorum) {
        quorum = true;
        quorumSince = Clock::now();
        log::info("rendezvous: {} node(s) joined round {} (--nnodes {}:{}); it closes when {} have joined or {} s "
                  "after quorum (--rdzv-last-call)",
                  count, round, options_.minNodes, options_.maxNodes, options_.maxNodes,
                  options_.lastCall.count() / 1000);
      }
      auto waited = std::chrono::duration_cast<Millis>(Clock::now() - quorumSince);
      if (waited >= options_.lastCall) {
        if (options_.usableMembers(count) > 0) {
          closeAfterLastCall(round);
          continue;
        }
        // No usable count among the joiners yet: poll the join counter for another node (a slice at a time).
        if (!waitingLogged) {
          log::info("rendezvous: {} node(s) joined round {}, but this job cannot run on {} node(s); waiting for {} "
                    "(--nnodes {}:{}), up to --rdzv-timeout ({} s)",
                    count, round, count,
                    options_.usableFrom(count + 1) > 0 ? fmt::format("{} node(s)", options_.usableFrom(count + 1))
                                                       : std::string("more nodes"),
                    options_.minNodes, options_.maxNodes, options_.joinTimeout.count() / 1000);
          waitingLogged = true;
        }
        store_->wait({key(round, "closed")}, std::min(kQuorumPoll, deadline.remaining()));
        continue;
      }
      store_->wait({key(round, "closed")}, std::min({options_.lastCall - waited, deadline.remaining(), slice}));
    }
  }
  int members = static_cast<int>(parse::toInt(closed.value_or("0")).value_or(0));
  // Stopped while it formed and could not withdraw: a spare just leaves the counts; a member tells the others
  // (below, once it has published the layout if that is its part).
  if (index >= members) {
    if (const int sig = elastic ? options_.pendingStop() : 0) leaveAsSpare(round, sig, /*waiting=*/false);
    return std::nullopt;
  }
  const bool isLarge = members > kFullMembershipNodes;  // == large with min == max
  std::string text;
  if (index == members - 1) {
    text = publishLayout(round, members, index, computeLayout(round, members), /*close=*/false);
  } else {
    if (!prefetch || isLarge != large) {
      try {
        placement = store_->get(placementKey(round, index, isLarge), std::min(kLayoutWait, deadline.remaining()));
      } catch (const TimeoutError&) {
        placement.reset();
      }
    }
    if (placement) {
      text = std::move(*placement);
    } else {
      // The last joiner did not publish within kLayoutWait (it died?): compute the deterministic layout here.
      auto layoutText = store_->compareSet(key(round, "layout"), "", computeLayout(round, members));
      text = isLarge ? layout::assignments(layoutText, members, round)[static_cast<size_t>(index)] : layoutText;
    }
  }
  if (text.rfind("error ", 0) == 0) DTRAIN_THROW(RendezvousError, "rendezvous: {}", text.substr(6));
  if (const int sig = elastic ? options_.pendingStop() : 0) leaveClosedRound(round, members, sig);
  return isLarge ? assembleLarge(round, members, index, text) : assemble(round, members, index, text);
}

// The `closing` key serialises the two ways an elastic round's join counter is read to decide something: closing
// it after the last call (the count read under the key is final: no withdrawal can lower it) and a withdrawal
// (the count is lowered only by the latest joiner, only while no closer holds the key). The max-th joiner closes
// without the key: its own add made the count max, so no withdrawal can succeed below it (count == index + 1 fails).
void Rendezvous::closeAfterLastCall(int round) {
  const std::string closing = key(round, "closing");
  const std::string mine = fmt::format("close {} {}", self_.hostname, self_.pid);
  std::string held = store_->compareSet(closing, "", mine);
  if (held.rfind("close ", 0) != 0) {
    // A withdrawal holds it for two round trips: look again shortly. One that holds it for kClosingSteal was
    // killed inside them (a second signal): its store calls would have failed long before, so take the key over.
    if (held != stuckHolder_) {
      stuckHolder_ = held;
      stuckSince_ = Clock::now();
    }
    if (Clock::now() - stuckSince_ < kClosingSteal) {
      store_->wait({key(round, "closed")}, kClosingRetry);
      return;
    }
    held = store_->compareSet(closing, held, mine);
    if (held != mine) return;
    log::warn("rendezvous: joiner {} of round {} began to withdraw {} s ago and never finished; closing without "
              "waiting for it",
              stuckHolder_.substr(stuckHolder_.find(" ") + 1), round, kClosingSteal.count() / 1000);
  }
  // Ours or another closer's: the count read now is final, and both closers compute the same value.
  const int usable = options_.usableMembers(static_cast<int>(store_->add(key(round, "count"), 0)));
  if (usable > 0) {
    store_->compareSet(key(round, "closed"), "", std::to_string(usable));
  } else if (held == mine) {
    store_->remove(closing);  // a withdrawal left no usable count: let later withdrawals run
  }
}

bool Rendezvous::withdrawBeforeClose(int round, int index) {
  const std::string closing = key(round, "closing");
  const std::string mine = fmt::format("withdraw {}", index);
  const std::string held = store_->compareSet(closing, "", mine);
  if (held != mine) return false;  // a closer (the round closes; we leave it then) or another withdrawal: later
  bool withdrawn = false;
  auto state = store_->batch({StoreOp::tryGet(key(round, "closed")), StoreOp::add(key(round, "count"), 0)});
  if (!state[0].value && state[1].number == index + 1) {
    // Our record goes first, so that whoever takes our index next never finds ours; then the counter, which only
    // moves if nobody joined since we read it.
    auto res = store_->batch({StoreOp::remove(key(round, fmt::format("node/{}", index))),
                              StoreOp::append(key(round, "records"), layout::withdrawnLine(index)),
                              StoreOp::compareSet(key(round, "count"), std::to_string(index + 1),
                                                  std::to_string(index))});
    withdrawn = res[2].value == std::to_string(index);
    std::vector<StoreOp> after;
    if (!withdrawn) {  // someone joined meanwhile: we stay in the round; put our record back
      after.push_back(StoreOp::set(key(round, fmt::format("node/{}", index)), self_.toJson()));
      after.push_back(StoreOp::append(key(round, "records"), layout::recordLine(index, self_)));
    } else if (index + 1 == options_.minNodes) {
      after.push_back(StoreOp::remove(key(round, "quorum")));  // the next minNodes-th joiner sets it again
    }
    after.push_back(StoreOp::remove(closing));
    store_->batch(after);
  } else {
    store_->remove(closing);
  }
  return withdrawn;
}

void Rendezvous::leaveClosedRound(int round, int members, int signal) {
  // The round closed with us in it: its other members would start their workers and wait --heartbeat-timeout for
  // our heartbeats. Ending it now makes them re-form without us at once (node_lost: a membership change in an
  // elastic job).
  RoundEvent e{RoundEventType::kNodeLost,
               fmt::format("node {} ({}) was stopped by signal {} while round {} formed", self_.hostname, self_.host,
                           signal, round),
               0, ""};
  store_->compareSet(key(round, "event"), "", e.toJson());
  throw SpareStopped(fmt::format("rendezvous at {}: stopped by signal {} while joining round {}, which closed "
                                 "with this node among its {}; ended the round so that the others re-form without it",
                                 options_.endpoint, signal, round, members),
                     signal);
}

std::string Rendezvous::placementKey(int round, int index, bool large) {
  return large ? key(round, fmt::format("assign/{}", index)) : key(round, "layout");
}

std::string Rendezvous::computeLayout(int round, int members, const std::vector<StoreResult>* inputs) {
  // One round trip (none when the caller read them): every joiner's records line and the round's restart counts.
  // A joiner whose line is not there yet (its append still in flight) or carries no record is read from its node
  // record (set before the append).
  auto got = inputs ? *inputs
                    : store_->batch({StoreOp::tryGet(key(round, "records")), StoreOp::tryGet(key(round, "restarts")),
                                     StoreOp::tryGet(key(round, "reforms"))});
  auto byIndex = layout::parseRecords(got[0].value.value_or(""), members);
  std::vector<StoreOp> missing;  // one pipelined batch of (blocking) gets for all of them
  for (int i = 0; i < members; ++i) {
    const auto& j = byIndex[static_cast<size_t>(i)];
    if (!j || j->record.empty()) missing.push_back(StoreOp::get(key(round, fmt::format("node/{}", i)), 30s));
  }
  auto records = missing.empty() ? std::vector<StoreResult>() : store_->batch(missing);
  std::vector<layout::Joined> joined(static_cast<size_t>(members));
  for (int i = 0, m = 0; i < members; ++i) {
    auto& j = byIndex[static_cast<size_t>(i)];
    if (!j || j->record.empty()) {
      auto& record = records[static_cast<size_t>(m++)].value;
      DTRAIN_CHECK_AS(RendezvousError, record.has_value(),
                      "rendezvous at {}: joiner {} of round {} published no record within 30 s", options_.endpoint, i,
                      round);
      auto n = NodeInfo::fromJson(*record);
      j = layout::Joined{i, n.nproc, n.requestedNodeRank, *record};
    }
    joined[static_cast<size_t>(i)] = std::move(*j);
  }
  auto count = [](const std::optional<std::string>& v) { return static_cast<int>(parse::toInt(v.value_or("0")).value_or(0)); };
  return layout::build(joined, count(got[1].value), count(got[2].value));
}

std::string Rendezvous::publishLayout(int round, int members, int myIndex, const std::string& mine, bool close) {
  // Deterministic, so a second writer (a member that gave up waiting) writes the same thing. One pipelined batch
  // for the layout, in a large round every joiner's assignment, and `closed` when asked (last).
  const bool large = members > kFullMembershipNodes;
  auto assignOps = [&](const std::string& layoutText, std::vector<StoreOp>& ops) {
    if (!large) return layoutText;
    auto texts = layout::assignments(layoutText, members, round);
    for (size_t i = 0; i < texts.size(); ++i) ops.push_back(StoreOp::set(key(round, fmt::format("assign/{}", i)), texts[i]));
    return texts[static_cast<size_t>(myIndex)];
  };
  std::vector<StoreOp> ops{StoreOp::compareSet(key(round, "layout"), "", mine)};
  ops.reserve(large ? static_cast<size_t>(members) + 2 : 2);
  std::string own = assignOps(mine, ops);
  if (close) ops.push_back(StoreOp::compareSet(key(round, "closed"), "", std::to_string(members)));
  auto res = store_->batch(ops);
  const std::string& won = res.front().value.value_or(mine);
  if (won == mine) return own;
  // Another member published first (it gave up waiting for us): its layout and assignments win.
  std::vector<StoreOp> again;
  own = assignOps(won, again);
  if (!again.empty()) store_->batch(again);
  return own;
}

namespace {

Member memberOf(const layout::Placed& p) {
  Member m;
  m.nodeRank = p.nodeRank;
  m.rankOffset = p.rankOffset;
  m.info = NodeInfo::fromJson(p.record);
  m.info.nproc = p.nproc;
  return m;
}

}  // namespace

RoundInfo Rendezvous::assemble(int round, int members, int myIndex, const std::string& text) {
  auto parsed = layout::parseLayout(text, members, round);
  RoundInfo info;
  info.round = round;
  info.numNodes = members;
  info.nodeRank = -1;
  info.worldSize = parsed.worldSize;
  info.restartCount = parsed.restarts;
  info.reformCount = parsed.reforms;
  for (const auto& p : parsed.nodes) {
    if (p.joinIndex == myIndex) {
      Member m;
      m.nodeRank = p.nodeRank;
      m.rankOffset = p.rankOffset;
      m.info = self_;
      info.nodeRank = p.nodeRank;
      info.rankOffset = p.rankOffset;
      info.members.push_back(std::move(m));
    } else {
      info.members.push_back(memberOf(p));
    }
  }
  DTRAIN_CHECK_AS(ProtocolError, info.nodeRank >= 0, "rendezvous: round {}'s layout has no entry for join index {}",
                  round, myIndex);
  info.masterAddr = info.members.front().info.host;
  info.masterPort = info.members.front().info.masterPort;
  resetSeen(info);
  return info;
}

RoundInfo Rendezvous::assembleLarge(int round, int members, int myIndex, const std::string& text) {
  auto parsed = layout::parseAssignment(text, members, round);
  DTRAIN_CHECK_AS(ProtocolError, parsed.nodes.front().joinIndex == myIndex,
                  "rendezvous: the assignment of join index {} in round {} is another joiner's: '{}'", myIndex, round,
                  text.substr(0, 200));
  RoundInfo info;
  info.round = round;
  info.numNodes = members;
  info.worldSize = parsed.worldSize;
  info.restartCount = parsed.restarts;
  info.reformCount = parsed.reforms;
  info.nodeRank = parsed.nodes.front().nodeRank;
  info.rankOffset = parsed.nodes.front().rankOffset;
  for (const auto& p : parsed.nodes) {
    if (p.nodeRank == info.nodeRank) {
      Member m;
      m.nodeRank = p.nodeRank;
      m.rankOffset = p.rankOffset;
      m.info = self_;
      info.members.push_back(std::move(m));
    } else {
      info.members.push_back(memberOf(p));
    }
  }
  std::sort(info.members.begin(), info.members.end(),
            [](const Member& a, const Member& b) { return a.nodeRank < b.nodeRank; });
  DTRAIN_CHECK_AS(ProtocolError, info.members.front().nodeRank == 0,
                  "rendezvous: the assignment of join index {} in round {} does not name node 0", myIndex, round);
  info.masterAddr = info.members.front().info.host;
  info.masterPort = info.members.front().info.masterPort;
  resetSeen(info);
  return info;
}

}  // namespace dtrain::rendezvous
