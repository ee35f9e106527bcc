// The rendezvous during a round (rendezvous.h): the watched members (all, or a ring above kFullMembershipNodes),
// heartbeats and the silence judgement, the round's end event, finishing, acknowledgement and advancing to the
// next round. Split from rendezvous.cpp, which joins and closes rounds (and rendezvous_spares.cpp, which waits
// between them).
#include <chrono>

#include "lib/common/clock.h"
#include "lib/common/parse.h"
#include "rendezvous/rendezvous.h"
#include "rendezvous/rendezvous_keys.h"
#include "rendezvous/round_layout.h"

namespace dtrain::rendezvous {

using detail::key;
using layout::ringWatched;
using namespace std::chrono_literals;
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
  auto counts = store_->batch({StoreOp::tryGet(key(round, "restarts")), StoreOp::tryGet(key(round, "reforms"))});
  auto count = [&](size_t i) { return static_cast<int>(parse::toInt(counts[i].value.value_or("0")).value_or(0)); };
  int restarts = count(0) + (restart ? 1 : 0);
  int reforms = count(1) + (restart ? 0 : 1);
  // Every agent computes the same values, so the compareSets are idempotent and the order of agents is irrelevant.
  store_->batch({StoreOp::compareSet(key(round + 1, "restarts"), "", std::to_string(restarts)),
                 StoreOp::compareSet(key(round + 1, "reforms"), "", std::to_string(reforms)),
                 StoreOp::compareSet("round", std::to_string(round), std::to_string(round + 1)),
                 StoreOp::set(key(round + 1, "open"), "1")});
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
  return judge(store_->multiGet(keys), timeout);
}

std::vector<int> Rendezvous::beat(const RoundInfo& info, Millis timeout) {
  if (seenRound_ != info.round) resetSeen(info);
  // Our counter first, then every watched one: one batch, one round trip.
  std::vector<StoreOp> ops;
  ops.reserve(seen_.size() + 1);
  ops.push_back(StoreOp::set(key(info.round, fmt::format("hb/{}", info.nodeRank)), std::to_string(++beats_)));
  for (const auto& s : seen_) ops.push_back(StoreOp::tryGet(key(info.round, fmt::format("hb/{}", s.nodeRank))));
  auto results = store_->batch(ops);
  std::vector<std::optional<std::string>> values;
  values.reserve(seen_.size());
  for (size_t i = 1; i < results.size(); ++i) values.push_back(std::move(results[i].value));
  return judge(values, timeout);
}

std::vector<int> Rendezvous::judge(const std::vector<std::optional<std::string>>& values, Millis timeout) {
  std::vector<int> silent;
  auto now = Clock::now();
  for (size_t i = 0; i < seen_.size(); ++i) {
    auto& s = seen_[i];
    // A counter that vanished is no beat: over etcd a dead agent's heartbeat key goes with its lease (one
    // --heartbeat-timeout after its last keep-alive). Counted as a change, it restarted the silence clock, so the
    // loss showed only after about twice the timeout: after the root-cause hold had already published the
    // survivors' broken collectives as a failure, and an elastic job failed instead of re-forming.
    if (!values[i] && !s.value.empty()) {
      if (now - s.changed > timeout) silent.push_back(s.nodeRank);
      continue;
    }
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
