// The worker environment contract (torchrun-compatible plus DTRAIN_*), built once per worker per round.
#pragma once

#include <string>
#include <vector>

#include "lib/launch/launch_options.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::launch {

struct WorkerContext {
  const rendezvous::RoundInfo* round = nullptr;
  int localRank = 0;
  std::string storeAddr;  // host:port of the rendezvous store, for DTRAIN_STORE
  std::string runId;
  int maxRestarts = 0;
};

// The agent's own environment with the contract variables set (overriding inherited values), as
// "NAME=value" strings ready for execve.
std::vector<std::string> workerEnvironment(const WorkerContext& ctx, int nprocOnThisNode);

// Just the contract variables, in a fixed order (for --dry-run and tests).
std::vector<std::pair<std::string, std::string>> contractVariables(const WorkerContext& ctx);

}  // namespace dtrain::launch
