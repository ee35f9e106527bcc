// The rendezvous protocol: agents (one per node) meet in numbered rounds through a Store, learn the group's
// membership, and agree on when a round ends (a failure, a lost node, a new node, a shutdown, or success).
//
// Keys live under `/dtrain/<run_id>/` (the Store passed in is already prefixed):
//   job                   the job fingerprint of the first agent ("<hex> <program summary>"), set once by
//                         compareSet; an agent with another fingerprint is refused (two jobs, one run id)
//   round                 current round number R (decimal); moved R -> R+1 by compareSet, so racing agents
//                         agree on one increment
//   r<R>/restarts         failure restarts before round R (set once, by compareSet, when the round opens)
//   r<R>/reforms          re-formations before round R: membership changes that did not consume a restart
//                         (a node joined an elastic job, or left it); bounded by --max-reforms
//   ended                 the job's terminal outcome (JSON RoundEvent of the round that ended it), written by every
//                         agent that exits after a round (first one wins): a later join() with this run id fails
//                         at once, naming the outcome, instead of waiting for a round that never opens
//   agreed_env            the first agent's RendezvousOptions::agreedEnv: later agents must have the same text
//   refused/count, refused/<n>  agents join() refused for another agreedEnv, or for another job's fingerprint
//                         while the run id's job has not ended: each adds 1 to the count and writes
//                         its NodeInfo and the reason (JSON) under the number it got, so that the job's first
//                         agent, blocked waiting for nodes, says at once who was refused and why (waitRefusal,
//                         RefusalWatcher: refusal_watcher.h, rendezvous_refusals.cpp) instead of only timing out
//   r<R>/count            join counter; a joiner's index is the counter value it got minus one (a joiner of a
//                         round that already closed gets an index >= its member count: it missed the round)
//   r<R>/node/<i>         the i-th joiner's NodeInfo (JSON)
//   r<R>/records          "<join index> <nproc> <node rank or -1> <NodeInfo JSON>\n" appended by each joiner:
//                         the layout's input, read in one get (formats in round_layout.h)
//   r<R>/layout           the round's membership in node-rank order, with the restart counts and every member's
//                         record; written once by the last joiner (any member after a wait if it died).
//                         Rounds up to kFullMembershipNodes: read once by each member, which then knows everything.
//   r<R>/assign/<i>       rounds of more than kFullMembershipNodes nodes: joiner i's assignment, written by the
//                         last joiner with the layout (one pipelined batch): world size, restart counts, and the
//                         place and record of joiner i itself, node 0 and the nodes it watches. A member reads only
//                         its own: O(1) bytes and operations per agent, where reading the layout is O(N) per agent
//                         and O(N^2) for the store to send
//   r<R>/quorum           set by the minNodes-th joiner of an elastic round (min < max): waiting joiners block on
//                         it instead of polling the join counter
//   r<R>/closed           N, the number of members; set once (compareSet) when `maxNodes` joined, or after
//                         `lastCall` once `minNodes` joined. Joiners with index >= N missed the round.
//   r<R>/closing          elastic rounds: the lock between closing after the last call ("close <host> <pid>", kept)
//                         and a stopped latest joiner withdrawing ("withdraw <i>", removed after it): the latter
//                         lowers `count` by one, so a closer reads the count only under the lock
//                         (docs/rendezvous.md, "Leaving a round that forms")
//   r<R>/event            the first thing that ends the round (JSON RoundEvent), set once by compareSet:
//                         "failed" (a worker failed, with its report), "node_lost" (missed heartbeats),
//                         "membership" (a node wants to join), "shutdown" (an agent was signalled),
//                         "done" (every node's workers succeeded). Everyone watches this one key.
//   r<R>/finished         count of nodes whose workers all succeeded; the one that makes it N sets "done"
//   r<R>/hb/<node rank>   heartbeat counter of each member, bumped every heartbeat interval
//   r<R>/acks, all_acked  after a terminal outcome: agents that saw it; the last one sets all_acked
//   r<R>/waiting          agents that missed round R (spares, late joiners) and wait for round R+1; with
//                         waiting_acks and waiting_acked, the same acknowledgement of a terminal outcome
//
// Scale (docs/rendezvous.md, scripts/bench/rdzv_scale): in rounds of more than kFullMembershipNodes nodes each
// agent learns its own assignment (node rank, rank offset, world size) and the records of node 0 and the
// kRingWatch nodes after it only, and watches only those nodes' heartbeats (a ring: every node is watched by its
// predecessor, so a loss is still seen while one member lives); smaller rounds read and watch everyone. Every
// agent's work per round and per heartbeat is O(1) store round trips (batches are pipelined: multiGet) and O(1)
// bytes, except the last joiner's O(N) layout.
//
// Ranks: members are ordered by their given node rank (when every member gave one) else by join order;
// global ranks are contiguous per node in that order, and nodes may run different numbers of workers.
//
// Thread-safety: a Rendezvous is used by one thread; watching for the round's event uses its own Store
// connection (see waitEvent), so the agent can block on it from a watcher thread.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous {

struct NodeInfo {
  int requestedNodeRank = -1;  // --node-rank, or -1 to take join order
  int nproc = 1;
  std::string host;        // address other nodes (and workers) use to reach this node
  std::string hostname;    // for reports
  int pid = 0;
  uint16_t masterPort = 0; // a free port on this node, used as MASTER_PORT if it becomes node 0
  std::string toJson() const;
  static NodeInfo fromJson(const std::string& json);
};

struct RendezvousOptions {
  int minNodes = 1;
  int maxNodes = 1;
  Millis joinTimeout{std::chrono::seconds(900)};  // whole join, waiting for nodes included
  Millis lastCall{std::chrono::seconds(30)};      // extra wait for more nodes once minNodes joined (min < max)
  std::string endpoint;                           // for messages only ("host:port")
  // "<hex> <summary>": identifies the job (launch::LaunchOptions::jobFingerprint). join() refuses, with a
  // RendezvousError naming both jobs, to join a run id whose first agent ran another job. Empty: no check.
  std::string jobFingerprint;
  // "NAME=value\n" lines (value "(unset)" when not set, in one order on every node): environment variables every
  // node must agree on (launch::agreedEnvironment). join() records the first agent's text under `agreed_env` and
  // refuses, with a RendezvousError naming the first variable that differs and both values, to join with another
  // text. Empty: no check.
  std::string agreedEnv;
  // Elastic jobs (min < max): node counts in [minNodes, maxNodes] whose world the job cannot run (its rank grid
  // does not divide it, or it leaves no trainer beside the parameter servers: train::unusableNodeCounts), in any
  // order. A round then closes with the largest usable count of the nodes that joined (never an unusable one):
  // the nodes beyond it wait for a later round as spares, and a round whose joiners give no usable count keeps
  // waiting for more. Every agent of a job must pass the same list (they compute it from the same job file).
  std::vector<int> unusableNodes;
  // This agent hosts the store (--rdzv-backend static, node 0): when it waits as a spare it says that stopping
  // it ends the job (the round's agents lose the store), since "spare" alone reads as "safe to stop".
  bool hostsStore = false;
  // Optional, for an agent stopped while it waits as a spare (join(), after it missed a round) or while an elastic
  // round it joined has not closed yet: armStop(true) when such a wait starts and armStop(false) when it ends (the
  // agent then only records a stop signal instead of dying at once); stopPending() is polled at least once a second
  // during it and returns the recorded signal or 0. A nonzero one makes join() take this agent out of the round's
  // counts (`count`: a later joiner is not counted with a node that left and does not re-form the round for
  // nothing; `waiting`: the store's host does not wait for it at the job's end), or, when an elastic round closed
  // with it before it could withdraw, end that round (node_lost), and throw SpareStopped. Both are called on
  // join()'s thread.
  std::function<void(bool)> armStop;
  std::function<int()> stopPending;
  // Optional: called once, on join()'s thread right after its first batch, when this agent recorded `agreed_env`
  // (it is the job's first agent: later agents are compared with it). The agent then watches for the agents
  // join() refuses (waitRefusal; RefusalWatcher, refusal_watcher.h) and logs them.
  std::function<void()> onFirstAgent;

  // Whether a round of `nodes` nodes can form: within [max(minNodes, 1), maxNodes] and not in unusableNodes.
  bool usable(int nodes) const;
  // The largest usable node count <= min(joined, maxNodes); 0 if none.
  int usableMembers(int joined) const;
  // The smallest node count >= max(atLeast, minNodes) and <= maxNodes that is not in unusableNodes; 0 if none:
  // how many nodes a round that has `atLeast - 1` joiners still needs to form.
  int usableFrom(int atLeast) const;
  // stopPending's recorded signal, or 0 (also without a stopPending).
  int pendingStop() const;
};

// Rounds up to this many nodes: every agent reads every member's record and watches every heartbeat.
inline constexpr int kFullMembershipNodes = 64;
// Larger rounds: each agent watches the heartbeats of this many successors (by node rank, modulo N).
inline constexpr int kRingWatch = 2;

struct Member {
  NodeInfo info;
  int nodeRank = 0;    // GROUP_RANK in this round
  int rankOffset = 0;  // global rank of its local rank 0
};

struct RoundInfo {
  int round = 0;
  int restartCount = 0;  // failure restarts before this round (DTRAIN_RESTART_COUNT)
  int reformCount = 0;   // re-formations (membership changes) before this round
  int nodeRank = 0;      // this agent's GROUP_RANK
  int numNodes = 0;      // GROUP_WORLD_SIZE
  int rankOffset = 0;
  int worldSize = 0;
  // The members this agent knows, ordered by node rank, each complete (info, nodeRank, rankOffset). Rounds of
  // up to kFullMembershipNodes nodes: every member, so members[r].nodeRank == r. Larger rounds: node 0, this
  // node and the watched ones (Rendezvous::watchedMembers) only; an agent never holds O(N) of the membership.
  // Look members up with member() / self() rather than by index.
  std::vector<Member> members;
  std::string masterAddr;       // node 0's host
  uint16_t masterPort = 0;
  // The member with node rank `nodeRank`, or nullptr when this agent does not know it (see `members`).
  const Member* member(int nodeRank) const;
  // This agent's own entry (throws ProtocolError if missing, which join() never returns).
  const Member& self() const;
};

// What ended a round. The names ("failed", "node_lost", ...) exist only in the store's JSON (toJson/fromJson
// and roundEventName/parseRoundEventType); code compares the enum.
enum class RoundEventType {
  kFailed,      // "failed": a worker failed; exitCode is its exit code, report quotes its stderr
  kNodeLost,    // "node_lost": a member missed heartbeats, or an agent lost the store
  kMembership,  // "membership": a node asks to join; the group re-forms without consuming a restart
  kShutdown,    // "shutdown": an agent was signalled (exitCode 128+signal), or a worker stopped after SIGUSR1
  kDone,        // "done": every node's workers succeeded
};

// The wire name of `type`; parseRoundEventType is its inverse (nullopt for an unknown name).
std::string_view roundEventName(RoundEventType type);
std::optional<RoundEventType> parseRoundEventType(std::string_view name);

struct RoundEvent {
  RoundEventType type = RoundEventType::kFailed;
  std::string message;  // one line for humans
  int exitCode = 0;     // for failed / shutdown: what `dtrain run` should exit with
  std::string report;   // multi-line root-cause report (failed)
  // {"type": name, "message", "exit_code", "report"}; fromJson throws ProtocolError for a malformed record
  // or an unknown type.
  std::string toJson() const;
  static RoundEvent fromJson(const std::string& json);
  // A failure consumes a restart (see `restarts` above).
  bool isFailure() const { return type == RoundEventType::kFailed || type == RoundEventType::kNodeLost; }
};

// Thrown by join() when the job ended while this agent, having joined, waited for a round that would include it
// (it was a spare: the round ran without it). `outcome` is the job's recorded outcome ("done" when it completed):
// the agent exits with the job's result rather than as a rendezvous failure.
class JobEndedWhileWaiting : public RendezvousError {
 public:
  JobEndedWhileWaiting(const std::string& what, RoundEvent outcome, int round, int members)
      : RendezvousError(what), outcome(std::move(outcome)), round(round), members(members) {}
  RoundEvent outcome;
  int round = 0;    // the last round that ran without this agent
  int members = 0;  // its node count (its agents acknowledge the end: Rendezvous::acknowledgeEnd)
};

// Thrown by join() when RendezvousOptions::stopPending reported a stop signal while this agent waited as a spare
// or in an elastic round that had not closed (it withdrew, or ended the round it was closed into: node_lost);
// the agent was taken out of the round's counts first. The agent ends as that signal would have ended it.
class SpareStopped : public RendezvousError {
 public:
  SpareStopped(const std::string& what, int signal) : RendezvousError(what), signal(signal) {}
  int signal = 0;
};

class Rendezvous {
 public:
  Rendezvous(StorePtr store, RendezvousOptions options, NodeInfo self);

  // Joins the current (or next) round and blocks until it closes with this agent in it. Throws
  // RendezvousError naming what was missing after joinTimeout, and at once when the run id already ended (see
  // `ended`) or belongs to another job; JobEndedWhileWaiting when the job ends while this agent waits for a
  // round after missing one (a spare, or a node that asked to join).
  RoundInfo join();

  // Ends `round` with `event` unless something else ended it first; returns the event that won.
  RoundEvent endRound(int round, const RoundEvent& event);
  // Blocks up to `timeout` for the round's event; nullopt when none yet. Uses `store` (give a watcher its
  // own connection).
  static std::optional<RoundEvent> waitEvent(Store& store, int round, Millis timeout);
  // Records that this node's workers all succeeded; the last node to finish ends the round with "done".
  void markFinished(const RoundInfo& info);
  // Moves the shared round counter past `round` (idempotent across agents) so the next join() starts fresh.
  // `restart`: the round ended in a failure that consumes a restart (restarts + 1); otherwise it is a
  // re-formation (reforms + 1). Every agent must pass the same value (decideAfterRound computes it from shared
  // state); the first agent's counts win.
  void advance(int round, bool restart);
  // Records the job's terminal outcome (`ended`) unless one is recorded already.
  void recordEnd(const RoundEvent& outcome);
  // Blocks up to `timeout` for the `index`-th (from 1) refused agent's record (`refused/<n>`); returns the line
  // that names it and the reason ("node HOSTNAME (ADDRESS, pid P, --node-rank R) was refused and exits with code 4:
  // REASON"; ADDRESS, its --local-addr or host, only when it is not HOSTNAME), or nullopt when none came. Uses
  // `store` (give a watcher its own connection); throws what the store throws.
  static std::optional<std::string> waitRefusal(Store& store, int index, Millis timeout);

  // Terminal outcomes: every agent acknowledges it saw the round's end; the agent hosting the store waits
  // (bounded) for all acknowledgements before it exits and takes the store with it.
  void acknowledgeEnd(const RoundInfo& info);
  bool waitAcknowledged(const RoundInfo& info, Millis timeout);
  // The same for the agents that joined `round` too late or as spares and wait for a next round (`waiting`,
  // `waiting_acks`): they see the end within a second (JobEndedWhileWaiting). True at once when none waits.
  bool waitSparesAcknowledged(int round, Millis timeout);

  // The node ranks whose heartbeats this agent watches: every other member in rounds of up to
  // kFullMembershipNodes, else the kRingWatch members after this one (modulo numNodes).
  static std::vector<int> watchedMembers(const RoundInfo& info);
  // Heartbeats: bump ours, and report watched members whose counter has not moved for `timeout` (by our clock).
  void heartbeat(const RoundInfo& info);
  std::vector<int> silentMembers(const RoundInfo& info, Millis timeout);
  // Both in one batch: one round trip per heartbeat interval (what the agent does).
  std::vector<int> beat(const RoundInfo& info, Millis timeout);
  // Seconds since each member's heartbeat counter last changed as silentMembers saw it (index: node rank; this
  // node's own entry is 0; -1 for members not watched, and before silentMembers first ran in this round).
  std::vector<double> heartbeatAges(const RoundInfo& info) const;

  Store& store() { return *store_; }

 private:
  int currentRound();
  static int parseRound(const std::string& value);
  void throwIfEnded(const std::optional<std::string>& ended);
  // The same for an agent that joined and waits for a next round: JobEndedWhileWaiting with the outcome.
  void throwIfEndedWhileWaiting(const std::optional<std::string>& ended, int round, int members);
  // Leaves this agent's record and `reason` under refused/<n> (best effort: a failure is logged at debug).
  void recordRefusal(const std::string& reason);
  // RendezvousError naming both jobs when `job` (the run id's recorded fingerprint) is another job's than ours;
  // `ended`: that job's recorded end, named too. While that job has not ended the refusal is recorded first.
  void throwIfAnotherJob(const std::string& job, const std::optional<std::string>& ended);
  // RendezvousError naming the first variable whose value differs between `recorded` (agreed_env) and ours.
  void throwIfEnvDisagrees(const std::string& recorded);
  // "; N node(s) came and were refused (...)" for a join timeout, given `refused/count`; "" when none was.
  static std::string refusedCountNote(const std::optional<std::string>& count);
  // A spare of `round` stopped by `signal` (RendezvousOptions::stopPending): out of the counts (`count`, and
  // `waiting` when it counted itself there), then SpareStopped.
  [[noreturn]] void leaveAsSpare(int round, int signal, bool waiting);
  // Elastic rounds, before they close (the `closing` key, docs/rendezvous.md "Leaving a round that forms"):
  // closes `round` after its last call with the count read under the key (or looks again shortly while a
  // withdrawal holds it).
  void closeAfterLastCall(int round);
  // Takes joiner `index` out of `round` if it is the latest joiner and the round has not closed: its record and
  // its place in `count` go, so the next joiner takes the index. False (nothing changed) otherwise.
  bool withdrawBeforeClose(int round, int index);
  // A member of `round` (closed with `members`) stopped by `signal` while it formed: ends the round (node_lost) so
  // that the others re-form at once, then SpareStopped.
  [[noreturn]] void leaveClosedRound(int round, int members, int signal);
  [[noreturn]] void throwJoinTimeout(int round);
  // After missing `round` (it closed without this agent): asks it to re-form when this agent would make a larger
  // usable count, else waits as a spare; returns the round that opened next. Extends `deadline` while the round's
  // node 0 beats. Throws JobEndedWhileWaiting, SpareStopped, or RendezvousError on timeout (rendezvous_spares.cpp).
  int waitForNextRound(int round, Deadline& deadline);
  std::optional<RoundInfo> tryJoinRound(int round, const Deadline& deadline);
  // The key holding joiner `index`'s place: the layout (small rounds) or its assignment (large).
  static std::string placementKey(int round, int index, bool large);
  // RoundInfo from the layout text (small rounds) / this joiner's assignment text (large).
  RoundInfo assemble(int round, int members, int myIndex, const std::string& layoutText);
  RoundInfo assembleLarge(int round, int members, int myIndex, const std::string& assignment);
  // The layout text of the round's first `members` joiners; `inputs`: the records, restarts and reforms keys
  // already read (else read here).
  std::string computeLayout(int round, int members, const std::vector<StoreResult>* inputs = nullptr);
  // Writes the layout `mine` (compareSet), for a large round every joiner's assignment, and with `close` the
  // round's `closed` key last, in one batch; returns what joiner `myIndex` needs: the layout that won (small
  // rounds) or its own assignment (large).
  std::string publishLayout(int round, int members, int myIndex, const std::string& mine, bool close);
  void resetSeen(const RoundInfo& info);
  // The watched counters just read (in seen_'s order) against what was seen before: the silent node ranks.
  std::vector<int> judge(const std::vector<std::optional<std::string>>& values, Millis timeout);

  StorePtr store_;
  RendezvousOptions options_;
  NodeInfo self_;
  // heartbeat bookkeeping, one entry per watched member: its node rank, the last counter value seen and when
  // it last changed
  struct Seen {
    int nodeRank = 0;
    std::string value;
    std::chrono::steady_clock::time_point changed;
  };
  std::vector<Seen> seen_;
  int seenRound_ = -1;
  int64_t beats_ = 0;
  // closeAfterLastCall: the withdrawal seen holding the round's `closing` key, and since when
  std::string stuckHolder_;
  std::chrono::steady_clock::time_point stuckSince_;
};

}  // namespace dtrain::rendezvous
