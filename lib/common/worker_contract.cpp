#include "lib/common/worker_contract.h"

#include <climits>

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain {

namespace {

using Lookup = std::function<std::optional<std::string>(const char*)>;

// An empty value counts as unset, as in env::getInt.
std::optional<std::string> value(const Lookup& lookup, const char* name) {
  auto v = lookup(name);
  if (!v || v->empty()) return std::nullopt;
  return v;
}

int intVar(const Lookup& lookup, const char* name, int fallback) {
  auto v = value(lookup, name);
  if (!v) return fallback;
  auto parsed = parse::toInt(*v);
  DTRAIN_CHECK_AS(UsageError, parsed.has_value() && *parsed >= INT_MIN && *parsed <= INT_MAX,
                  "environment variable {}={}: expected an integer", name, *v);
  return static_cast<int>(*parsed);
}

// DTRAIN_X, else its torchelastic alias, else the fallback.
int intVarOrAlias(const Lookup& lookup, const char* name, const char* alias, int fallback) {
  return value(lookup, name) ? intVar(lookup, name, fallback) : intVar(lookup, alias, fallback);
}

}  // namespace

WorkerContract WorkerContract::fromEnv() { return fromEnv([](const char* name) { return env::get(name); }); }

WorkerContract WorkerContract::fromEnv(const Lookup& lookup) {
  WorkerContract c;
  c.rank = intVar(lookup, "RANK", 0);
  c.worldSize = intVar(lookup, "WORLD_SIZE", 1);
  // Started by hand without the launcher's node variables: one node, as torchrun --standalone sets them.
  c.localRank = intVar(lookup, "LOCAL_RANK", c.rank);
  c.localWorldSize = intVar(lookup, "LOCAL_WORLD_SIZE", c.worldSize);
  c.nodeRank = intVar(lookup, "GROUP_RANK", 0);
  c.numNodes = intVar(lookup, "GROUP_WORLD_SIZE", 1);
  c.roleRank = intVar(lookup, "ROLE_RANK", c.rank);
  c.roleWorldSize = intVar(lookup, "ROLE_WORLD_SIZE", c.worldSize);
  c.roleName = value(lookup, "ROLE_NAME").value_or("default");
  c.masterAddr = value(lookup, "MASTER_ADDR").value_or("");
  c.masterPort = intVar(lookup, "MASTER_PORT", 0);
  c.store = value(lookup, "DTRAIN_STORE").value_or("");
  c.storeToken = value(lookup, "DTRAIN_RDZV_TOKEN").value_or("");
  c.runId = value(lookup, "DTRAIN_RUN_ID").value_or(value(lookup, "TORCHELASTIC_RUN_ID").value_or("none"));
  c.round = intVar(lookup, "DTRAIN_ROUND", 0);
  c.restartCount = intVarOrAlias(lookup, "DTRAIN_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", 0);
  c.maxRestarts = intVarOrAlias(lookup, "DTRAIN_MAX_RESTARTS", "TORCHELASTIC_MAX_RESTARTS", 0);

  DTRAIN_CHECK_AS(UsageError, c.worldSize >= 1 && c.rank >= 0 && c.rank < c.worldSize,
                  "RANK={} WORLD_SIZE={}: expected 0 <= RANK < WORLD_SIZE", c.rank, c.worldSize);
  DTRAIN_CHECK_AS(UsageError, c.localWorldSize >= 1 && c.localRank >= 0 && c.localRank < c.localWorldSize,
                  "LOCAL_RANK={} LOCAL_WORLD_SIZE={}: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE", c.localRank,
                  c.localWorldSize);
  DTRAIN_CHECK_AS(UsageError, c.nodeRank >= 0 && c.numNodes >= 1, "GROUP_RANK={} GROUP_WORLD_SIZE={}: expected "
                  "GROUP_RANK >= 0 and GROUP_WORLD_SIZE >= 1", c.nodeRank, c.numNodes);
  DTRAIN_CHECK_AS(UsageError, c.masterPort >= 0 && c.masterPort <= 65535,
                  "environment variable MASTER_PORT={}: expected a port number (0-65535)", c.masterPort);
  DTRAIN_CHECK_AS(UsageError, c.round >= 0 && c.restartCount >= 0 && c.maxRestarts >= 0,
                  "DTRAIN_ROUND={} DTRAIN_RESTART_COUNT={} DTRAIN_MAX_RESTARTS={}: expected counts >= 0", c.round,
                  c.restartCount, c.maxRestarts);
  return c;
}

std::vector<std::pair<std::string, std::string>> WorkerContract::toEnv() const {
  auto s = [](int v) { return std::to_string(v); };
  std::vector<std::pair<std::string, std::string>> env = {
      {"RANK", s(rank)},
      {"LOCAL_RANK", s(localRank)},
      {"WORLD_SIZE", s(worldSize)},
      {"LOCAL_WORLD_SIZE", s(localWorldSize)},
      {"GROUP_RANK", s(nodeRank)},
      {"GROUP_WORLD_SIZE", s(numNodes)},
      {"ROLE_RANK", s(roleRank)},
      {"ROLE_WORLD_SIZE", s(roleWorldSize)},
      {"ROLE_NAME", roleName},
      {"MASTER_ADDR", masterAddr},
      {"MASTER_PORT", s(masterPort)},
      {"DTRAIN_STORE", store},
      {"DTRAIN_RUN_ID", runId},
      {"DTRAIN_ROUND", s(round)},
      {"DTRAIN_RESTART_COUNT", s(restartCount)},
      {"DTRAIN_MAX_RESTARTS", s(maxRestarts)},
      {"TORCHELASTIC_RUN_ID", runId},
      {"TORCHELASTIC_RESTART_COUNT", s(restartCount)},
      {"TORCHELASTIC_MAX_RESTARTS", s(maxRestarts)},
  };
  if (!storeToken.empty()) env.emplace_back("DTRAIN_RDZV_TOKEN", storeToken);
  return env;
}

}  // namespace dtrain
