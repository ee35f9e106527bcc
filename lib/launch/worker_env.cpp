#include "lib/launch/worker_env.h"

#include <cstdlib>
#include <map>

extern char** environ;

namespace dtrain::launch {

std::vector<std::pair<std::string, std::string>> contractVariables(const WorkerContext& ctx) {
  const auto& r = *ctx.round;
  const auto& me = r.members.at(r.nodeRank);
  auto s = [](auto v) { return std::to_string(v); };
  return {
      {"RANK", s(r.rankOffset + ctx.localRank)},
      {"LOCAL_RANK", s(ctx.localRank)},
      {"WORLD_SIZE", s(r.worldSize)},
      {"LOCAL_WORLD_SIZE", s(me.info.nproc)},
      {"GROUP_RANK", s(r.nodeRank)},
      {"GROUP_WORLD_SIZE", s(r.numNodes)},
      // torchrun also exports these two; ROLE_* describe the single "default" role.
      {"ROLE_RANK", s(r.rankOffset + ctx.localRank)},
      {"ROLE_WORLD_SIZE", s(r.worldSize)},
      {"ROLE_NAME", "default"},
      {"MASTER_ADDR", r.masterAddr},
      {"MASTER_PORT", s(r.masterPort)},
      {"DTRAIN_STORE", ctx.storeAddr},
      {"DTRAIN_RUN_ID", ctx.runId},
      {"DTRAIN_ROUND", s(r.round)},
      {"DTRAIN_RESTART_COUNT", s(r.restartCount)},
      {"DTRAIN_MAX_RESTARTS", s(ctx.maxRestarts)},
      {"TORCHELASTIC_RUN_ID", ctx.runId},
      {"TORCHELASTIC_RESTART_COUNT", s(r.restartCount)},
      {"TORCHELASTIC_MAX_RESTARTS", s(ctx.maxRestarts)},
  };
}

std::vector<std::string> workerEnvironment(const WorkerContext& ctx, int nprocOnThisNode) {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv(*e);
    auto eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  for (auto& [k, v] : contractVariables(ctx)) env[k] = v;
  // Several workers on one node each spinning up one OpenMP/BLAS thread per core oversubscribe it.
  if (nprocOnThisNode > 1 && env.find("OMP_NUM_THREADS") == env.end()) env["OMP_NUM_THREADS"] = "1";
  std::vector<std::string> out;
  out.reserve(env.size());
  for (auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

}  // namespace dtrain::launch
