// The rendezvous after a missed round (rendezvous.h): which node counts a round may form with, waiting for a next
// round (as a spare, or after asking the round to re-form), leaving as a stopped spare, and the acknowledgement of
// the job's end by the waiting agents. Split from rendezvous.cpp, which joins and closes rounds.
#include <algorithm>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "rendezvous/rendezvous.h"
#include "rendezvous/rendezvous_keys.h"

namespace dtrain::rendezvous {

using detail::kEndedPoll;
using detail::key;

bool RendezvousOptions::usable(int nodes) const {
  return nodes >= std::max(minNodes, 1) && nodes <= maxNodes &&
         std::find(unusableNodes.begin(), unusableNodes.end(), nodes) == unusableNodes.end();
}

int RendezvousOptions::usableMembers(int joined) const {
  for (int n = std::min(joined, maxNodes); n >= minNodes && n > 0; --n)
    if (usable(n)) return n;
  return 0;
}

int RendezvousOptions::usableFrom(int atLeast) const {
  for (int n = std::max({atLeast, minNodes, 1}); n <= maxNodes; ++n)
    if (usable(n)) return n;
  return 0;
}

int RendezvousOptions::pendingStop() const { return stopPending ? stopPending() : 0; }

int Rendezvous::waitForNextRound(int round, Deadline& deadline) {
  // We missed round `round` (it closed without us). If a re-formed round could hold more nodes than it runs
  // (room below max nodes, and a usable count above its own among those that joined: us and any other
  // spare), ask its members to re-form so we can join; otherwise we are a spare. Either way wait for the next
  // round to open.
  auto state = store_->batch({StoreOp::tryGet(key(round, "closed")), StoreOp::add(key(round, "count"), 0)});
  int members = state[0].value ? static_cast<int>(parse::toInt(*state[0].value).value_or(0)) : 0;
  const int joined = static_cast<int>(state[1].number);
  detail::ArmedStop armed(options_);  // from before our line: a stop after it is deferred
  // Counted, so that the agent hosting the store outlives our last read when the job ends (waitSparesAcknowledged),
  // before our line is logged: a stop seen after it finds us counted, so leaveAsSpare's -1 balances it.
  store_->add(key(round, "waiting"), 1);
  if (options_.usableMembers(joined) > members) {
    RoundEvent e{RoundEventType::kMembership,
                 fmt::format("node {} ({}) asks to join", self_.hostname, self_.host), 0, ""};
    store_->compareSet(key(round, "event"), "", e.toJson());
  } else if (members < options_.maxNodes) {
    log::info("rendezvous: round {} runs {} node(s); {} node(s) cannot run this job, so this node waits as a "
              "spare for a later round (one that re-forms after a failure, a lost node or another join){}",
              round, members, std::min(joined, options_.maxNodes),
              options_.hostsStore ? "; it hosts the rendezvous store, so stopping it ends the job" : "");
  } else {
    // A full fixed-size round: the node used to wait without a word.
    log::info("rendezvous: round {} already runs {} node(s), the most this job takes (--nnodes {}); this node "
              "waits for a later round (one that re-forms after a failure or a lost node), or the job's end",
              round, members, options_.maxNodes == options_.minNodes
                                  ? std::to_string(options_.maxNodes)
                                  : fmt::format("{}:{}", options_.minNodes, options_.maxNodes));
  }
  // A job that ends while we wait is reported within a slice, not after the whole timeout. While the round
  // runs (its node 0 heartbeats), a spare waits on: the timeout counts from the last beat it saw, so only a
  // round whose agents all vanished without an outcome makes it give up.
  bool opened = false;
  std::optional<std::string> lastBeat;
  while (!opened && !deadline.expired()) {
    if (const int sig = options_.pendingStop()) leaveAsSpare(round, sig, /*waiting=*/true);
    opened = store_->wait({key(round + 1, "open")}, std::min(kEndedPoll, deadline.remaining()));
    if (opened) break;
    auto seen = store_->batch({StoreOp::tryGet("ended"), StoreOp::tryGet(key(round, "hb/0"))});
    throwIfEndedWhileWaiting(seen[0].value, round, members);
    if (seen[1].value && seen[1].value != lastBeat) {
      deadline = Deadline(options_.joinTimeout);
      lastBeat = seen[1].value;
    }
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
    if (lastBeat)  // it beat while we waited, then stopped: its agents are gone, not running
      DTRAIN_THROW(RendezvousError,
                   "rendezvous at {} timed out after {} s: round {} ran with {} node(s), but its node 0 sent no "
                   "heartbeat for the last {} s and no new round opened for this node (were the round's agents "
                   "killed? a job whose agents all died records no outcome); use a new --rdzv-id",
                   options_.endpoint, options_.joinTimeout.count() / 1000, round, members,
                   options_.joinTimeout.count() / 1000);
    DTRAIN_THROW(RendezvousError,
                 "rendezvous at {} timed out after {} s: round {} is running with {} node(s) and no new "
                 "round opened for this node",
                 options_.endpoint, options_.joinTimeout.count() / 1000, round, members);
  }
  // A stop during the last slice: leave now rather than join the next round and die in it.
  if (const int sig = options_.pendingStop()) leaveAsSpare(round, sig, /*waiting=*/true);
  return currentRound();
}

void Rendezvous::throwIfEndedWhileWaiting(const std::optional<std::string>& ended, int round, int members) {
  if (!ended) return;
  auto outcome = RoundEvent::fromJson(*ended);
  // Our last read of the store: the last waiting agent to see the end tells the store's host it may go.
  auto counts = store_->batch({StoreOp::add(key(round, "waiting_acks"), 1), StoreOp::add(key(round, "waiting"), 0)});
  if (counts[0].number >= counts[1].number) store_->set(key(round, "waiting_acked"), "1");
  if (outcome.type == RoundEventType::kDone)
    throw JobEndedWhileWaiting(fmt::format("rendezvous at {}: this node waited for a round that would include it",
                                           options_.endpoint),
                               outcome, round, members);
  throw JobEndedWhileWaiting(fmt::format("rendezvous at {}: the job ended while this node waited for a round that "
                                         "would include it ({}, exit code {}: {})",
                                         options_.endpoint, roundEventName(outcome.type), outcome.exitCode,
                                         outcome.message),
                             outcome, round, members);
}

void Rendezvous::leaveAsSpare(int round, int signal, bool waiting) {
  // The round closed before we joined it (closed <= our index), so `count` no longer places anyone: it only
  // tells later joiners how many nodes wait. Our `waiting` share goes too; if the job already ended and the other
  // waiting agents all acknowledged it, we were the one the store's host still waited for.
  auto counts = store_->batch({StoreOp::add(key(round, "count"), -1), StoreOp::add(key(round, "waiting"), waiting ? -1 : 0),
                               StoreOp::add(key(round, "waiting_acks"), 0)});
  if (counts[2].number > 0 && counts[2].number >= counts[1].number) store_->set(key(round, "waiting_acked"), "1");
  throw SpareStopped(fmt::format("rendezvous at {}: stopped by signal {} while waiting as a spare for a round after "
                                 "round {}; this node left the group's counts",
                                 options_.endpoint, signal, round),
                     signal);
}

bool Rendezvous::waitSparesAcknowledged(int round, Millis timeout) {
  const int64_t waiting = store_->add(key(round, "waiting"), 0);
  if (waiting == 0) return true;
  log::debug("waiting up to {} ms for {} agent(s) waiting for a round after round {} to see the job's end",
             timeout.count(), waiting, round);
  return store_->wait({key(round, "waiting_acked")}, timeout);
}

}  // namespace dtrain::rendezvous
