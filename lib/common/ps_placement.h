// Where the parameter-server strategy's server ranks sit in a world, and each rank's role (docs/parameter_server.md).
//
// The servers are ranks of the same world as the workers (`"parallel": {"strategy": "parameter_server", "servers":
// S}`), spread evenly over the nodes: node n of N hosts S / N servers, one more on the last S % N nodes (node 0,
// which hosts the store and rank 0's logging, is the last to get an extra one). On a node the servers are the last
// local ranks, so a worker keeps its LOCAL_RANK and the workers of a node stay contiguous. Role ranks count in
// global-rank order: server k is the k-th server rank, worker k the k-th worker rank.
//
// Everything here is a pure function of what every rank already knows from the worker contract (RANK, LOCAL_RANK,
// LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE) and S, so the launcher (ROLE_NAME/ROLE_RANK/ROLE_WORLD_SIZE) and
// a worker started by hand compute the same roles without talking. Nodes may have different sizes: a rank's
// worker role rank uses RANK - LOCAL_RANK (the ranks on earlier nodes) minus the servers on earlier nodes.
// Errors: UsageError when the servers do not fit (S >= the world size, or more servers than ranks on a node).
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <vector>

#include "lib/common/worker_contract.h"

namespace dtrain {

inline constexpr const char* kRoleServer = "server";
inline constexpr const char* kRoleWorker = "worker";

// Servers node `node` of `numNodes` hosts when the job has `servers` of them.
int psServersOnNode(int node, int numNodes, int servers);
// Servers on nodes 0 .. node-1.
int psServersBefore(int node, int numNodes, int servers);

struct PsRole {
  bool server = false;
  int roleRank = 0;       // server index or worker index
  int roleWorldSize = 1;  // servers, or workers (WORLD_SIZE - servers)
  int localRoleSize = 1;  // ranks of this role on this node
};

// The role of the rank `c` describes. UsageError when the servers do not fit this world or this node.
PsRole psRole(const WorkerContract& c, int servers);

// `c` with its ROLE_NAME / ROLE_RANK / ROLE_WORLD_SIZE set from psRole (servers > 0); unchanged when servers == 0.
WorkerContract withPsRole(WorkerContract c, int servers);

// A worker's view of the world as its workers-only collective group sees it: rank = worker index, world =
// workers, local world = the workers on this node (LOCAL_RANK is unchanged: servers are the node's last ranks).
WorkerContract workerView(const WorkerContract& c, int servers);

// The placement `dtrain run --dry-run` and `dtrain check --world N` print, one line per node, e.g.
// "node 0: ranks 0-1 workers 0-1, rank 2 server 0". `nprocPerNode` lists every node's rank count.
std::string psPlacement(const std::vector<int>& nprocPerNode, int servers);

}  // namespace dtrain
