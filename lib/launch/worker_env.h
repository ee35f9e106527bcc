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
  std::string localAddr;   // --local-addr: the workers' DTRAIN_COMM_HOST unless the agent's environment sets one
};

// The contract of local worker ctx.localRank in ctx.round.
WorkerContract workerContract(const WorkerContext& ctx);

// The agent's own environment with the contract variables set (overriding inherited values), the
// OMP_NUM_THREADS rule applied, and DTRAIN_COMM_HOST=ctx.localAddr when --local-addr was given and the environment
// sets no (non-empty) DTRAIN_COMM_HOST: the collectives and the parameter servers then listen on and advertise
// --local-addr (comm::tcp::chooseHost), as the agent does. "NAME=value" strings ready for execve.
std::vector<std::string> workerEnvironment(const WorkerContext& ctx);

// Workers inherit the agent's environment, and a few variables decide which collectives the ranks run, so ranks
// of nodes that disagree on them wait for each other until parallel.timeout. These (kAgreedVariables), as
// "NAME=value\n" lines in that order, value "(unset)" when unset or empty, DTRAIN_COMPRESSION_HOST_STAGING
// normalised to true/false when it reads as a boolean and the tcp sizes to their byte count when they read as a
// size (64K and 65536 both "65536", as the backend reads them): rendezvous::RendezvousOptions::agreedEnv, which the
// rendezvous compares between nodes. Reads the process environment.
inline constexpr const char* kAgreedVariables[] = {
    "DTRAIN_COMPRESSION_HOST_STAGING",  // top-k / PowerSGD on the device or staged through host memory
    "DTRAIN_TCP_SMALL_BYTES",           // recursive doubling below it, the ring above
    "DTRAIN_TCP_CHUNK_BYTES",           // the ring's pipeline unit
    "DTRAIN_TCP_BLOCK_BYTES",           // the ring all-reduce's block
};
std::string agreedEnvironment();

}  // namespace dtrain::launch
