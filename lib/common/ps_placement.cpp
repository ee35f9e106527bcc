#include "lib/common/ps_placement.h"

#include <fmt/format.h>

#include "lib/common/error.h"

namespace dtrain {

int psServersOnNode(int node, int numNodes, int servers) {
  const int base = servers / numNodes;
  const int extra = servers % numNodes;
  return base + (node >= numNodes - extra ? 1 : 0);
}

int psServersBefore(int node, int numNodes, int servers) {
  int sum = 0;
  for (int n = 0; n < node; ++n) sum += psServersOnNode(n, numNodes, servers);
  return sum;
}

PsRole psRole(const WorkerContract& c, int servers) {
  DTRAIN_CHECK_AS(UsageError, servers >= 1 && servers < c.worldSize,
                  "parameter server: {} server(s) in a world of {} rank(s): expected 1 <= parallel.servers < world "
                  "size, so that at least one rank trains",
                  servers, c.worldSize);
  const int here = psServersOnNode(c.nodeRank, c.numNodes, servers);
  DTRAIN_CHECK_AS(UsageError, here <= c.localWorldSize,
                  "parameter server: node {} must host {} server(s) but runs {} rank(s); give it more ranks "
                  "(--nproc-per-node) or use fewer servers",
                  c.nodeRank, here, c.localWorldSize);
  const int before = psServersBefore(c.nodeRank, c.numNodes, servers);
  const int localWorkers = c.localWorldSize - here;
  PsRole r;
  if (c.localRank >= localWorkers) {
    r.server = true;
    r.roleRank = before + (c.localRank - localWorkers);
    r.roleWorldSize = servers;
    r.localRoleSize = here;
  } else {
    const int ranksBefore = c.rank - c.localRank;
    r.roleRank = ranksBefore - before + c.localRank;
    r.roleWorldSize = c.worldSize - servers;
    r.localRoleSize = localWorkers;
  }
  return r;
}

WorkerContract withPsRole(WorkerContract c, int servers) {
  if (servers <= 0) return c;
  const PsRole r = psRole(c, servers);
  c.roleName = r.server ? kRoleServer : kRoleWorker;
  c.roleRank = r.roleRank;
  c.roleWorldSize = r.roleWorldSize;
  return c;
}

WorkerContract workerView(const WorkerContract& c, int servers) {
  const PsRole r = psRole(c, servers);
  DTRAIN_CHECK_AS(UsageError, !r.server, "rank {} is a parameter server, not a worker", c.rank);
  WorkerContract v = c;
  v.rank = r.roleRank;
  v.worldSize = r.roleWorldSize;
  v.localWorldSize = r.localRoleSize;
  v.roleName = kRoleWorker;
  v.roleRank = r.roleRank;
  v.roleWorldSize = r.roleWorldSize;
  return v;
}

std::string psPlacement(const std::vector<int>& nprocPerNode, int servers) {
  const int numNodes = static_cast<int>(nprocPerNode.size());
  int world = 0;
  for (int n : nprocPerNode) world += n;
  std::string out;
  auto span = [](int a, int b) { return a == b ? fmt::format("{}", a) : fmt::format("{}-{}", a, b); };
  int rank = 0, worker = 0, server = 0;
  for (int n = 0; n < numNodes; ++n) {
    const int here = psServersOnNode(n, numNodes, servers);
    DTRAIN_CHECK_AS(UsageError, servers < world && here <= nprocPerNode[n],
                    "parameter server: {} server(s) do not fit {} rank(s) on {} node(s) (node {} has {}); expected "
                    "1 <= parallel.servers < world size",
                    servers, world, numNodes, n, nprocPerNode[n]);
    const int workers = nprocPerNode[n] - here;
    out += fmt::format("node {}:", n);
    if (workers > 0)
      out += fmt::format(" rank{} {} worker{} {}", workers > 1 ? "s" : "", span(rank, rank + workers - 1),
                         workers > 1 ? "s" : "", span(worker, worker + workers - 1));
    if (here > 0)
      out += fmt::format("{} rank{} {} server{} {}", workers > 0 ? "," : "", here > 1 ? "s" : "",
                         span(rank + workers, rank + workers + here - 1), here > 1 ? "s" : "",
                         span(server, server + here - 1));
    out += "\n";
    rank += nprocPerNode[n];
    worker += workers;
    server += here;
  }
  return out;
}

}  // namespace dtrain
