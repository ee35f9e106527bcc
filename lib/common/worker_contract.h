// The worker contract: what the launcher tells each worker through its environment, written in one place
// (toEnv, used by lib/launch) and read in one place (fromEnv, used by the trainer, comm::optionsFromEnv and
// the benchmarks).
//
// Names follow torchrun, so a PyTorch script runs under `dtrain run` unchanged:
//   RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (the node's rank), GROUP_WORLD_SIZE (nodes),
//   ROLE_RANK, ROLE_WORLD_SIZE, ROLE_NAME, MASTER_ADDR, MASTER_PORT,
// plus dtrain's own DTRAIN_STORE (host:port of the rendezvous store), DTRAIN_RUN_ID, DTRAIN_ROUND,
// DTRAIN_RESTART_COUNT, DTRAIN_MAX_RESTARTS, and torchelastic's aliases TORCHELASTIC_RUN_ID,
// TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS (fromEnv falls back to them when the DTRAIN_ names are
// absent, e.g. a worker started by torchrun itself).
//
// Defaults (fromEnv with nothing set) describe a one-process job: rank 0 of 1, run id "none". A worker started
// by hand with only RANK and WORLD_SIZE is taken to be on one node, as `torchrun --standalone` would have set
// it: LOCAL_RANK defaults to RANK and LOCAL_WORLD_SIZE to WORLD_SIZE. (Before this struct the trainer defaulted
// LOCAL_RANK to 0 and LOCAL_WORLD_SIZE to 1 while comm defaulted them to RANK/WORLD_SIZE, so the two disagreed
// about which ranks share a node; torchrun's single-node values are the ones that agree with every backend.)
//
// Errors: fromEnv throws UsageError naming the variable for a malformed value ("environment variable RANK=x:
// expected an integer") and for values that describe no rank ("RANK=3 WORLD_SIZE=2: expected 0 <= RANK <
// WORLD_SIZE"). Whether a store is required is the caller's decision (a one-rank job needs none).
// Thread-safety: a plain value type; fromEnv reads the process environment (getenv).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dtrain {

struct WorkerContract {
  int rank = 0;            // RANK: global rank
  int worldSize = 1;       // WORLD_SIZE
  int localRank = 0;       // LOCAL_RANK: rank among this node's workers
  int localWorldSize = 1;  // LOCAL_WORLD_SIZE: workers on this node
  int nodeRank = 0;        // GROUP_RANK: this node's rank (the launching agent's)
  int numNodes = 1;        // GROUP_WORLD_SIZE: nodes (agents) in the round
  int roleRank = 0;        // ROLE_RANK: rank among the workers of this role
  int roleWorldSize = 1;   // ROLE_WORLD_SIZE
  std::string roleName = "default";  // ROLE_NAME
  std::string masterAddr;  // MASTER_ADDR: node 0's host (for torch's own store); empty when unset
  int masterPort = 0;      // MASTER_PORT; 0 when unset
  std::string store;       // DTRAIN_STORE: host:port of the rendezvous store; empty when alone
  std::string runId = "none";  // DTRAIN_RUN_ID (TORCHELASTIC_RUN_ID)
  int round = 0;           // DTRAIN_ROUND: rendezvous round this worker was started in
  int restartCount = 0;    // DTRAIN_RESTART_COUNT (TORCHELASTIC_RESTART_COUNT): failure restarts so far
  int maxRestarts = 0;     // DTRAIN_MAX_RESTARTS (TORCHELASTIC_MAX_RESTARTS)

  // Reads the contract from the process environment; see the header comment for defaults and errors.
  static WorkerContract fromEnv();
  // The same from any lookup (nullopt: unset). For tests and for environments that are not this process's.
  static WorkerContract fromEnv(const std::function<std::optional<std::string>(const char*)>& lookup);

  // Every contract variable as NAME/value, in a fixed order (torchrun's names first). The launcher sets these
  // over the inherited environment.
  std::vector<std::pair<std::string, std::string>> toEnv() const;

  // torchrun's thread rule: several workers on one node, each spinning up one OpenMP/BLAS thread per core,
  // oversubscribe it, so each gets OMP_NUM_THREADS=1 unless the user set the variable.
  static constexpr const char* kOmpNumThreads = "OMP_NUM_THREADS";
  bool wantsOneOmpThread() const { return localWorldSize > 1; }

  bool operator==(const WorkerContract&) const = default;
};

}  // namespace dtrain
