// The worker environment contract (lib/common/worker_contract.h) as the launcher fills it, once per worker per
// round.
#pragma once

#include <string>
#include <vector>

#include "lib/common/worker_contract.h"
#include "lib/launch/launch_options.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::launch {

struct WorkerContext {
  const rendezvous::RoundInfo* round = nullptr;
  int localRank = 0;
  std::string storeAddr;  // host:port of the rendezvous store, for DTRAIN_STORE
  std::string runId;
  int maxRestarts = 0;
  std::string storeToken;  // DTRAIN_RDZV_TOKEN; empty: not set by the contract
  int psServers = 0;       // > 0: ROLE_* from the parameter-server placement (lib/common/ps_placement.h)
};

// The contract of local worker ctx.localRank in ctx.round.
WorkerContract workerContract(const WorkerContext& ctx);

// The agent's own environment with the contract variables set (overriding inherited values) and the
// OMP_NUM_THREADS rule applied, as "NAME=value" strings ready for execve.
std::vector<std::string> workerEnvironment(const WorkerContext& ctx);

}  // namespace dtrain::launch
