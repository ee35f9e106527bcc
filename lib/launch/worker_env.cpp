#include "lib/launch/worker_env.h"

#include <map>

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/common/ps_placement.h"

extern char** environ;

namespace dtrain::launch {

WorkerContract workerContract(const WorkerContext& ctx) {
  const auto& r = *ctx.round;
  const auto& me = r.self();
  WorkerContract c;
  c.rank = r.rankOffset + ctx.localRank;
  c.worldSize = r.worldSize;
  c.localRank = ctx.localRank;
  c.localWorldSize = me.info.nproc;
  c.nodeRank = r.nodeRank;
  c.numNodes = r.numNodes;
  // torchrun also exports ROLE_*; they describe the single "default" role.
  c.roleRank = c.rank;
  c.roleWorldSize = c.worldSize;
  c.roleName = "default";
  c.masterAddr = r.masterAddr;
  c.masterPort = r.masterPort;
  c.store = ctx.storeAddr;
  c.storeToken = ctx.storeToken;
  c.runId = ctx.runId;
  c.round = r.round;
  c.restartCount = r.restartCount;
  c.maxRestarts = ctx.maxRestarts;
  try {
    return withPsRole(c, ctx.psServers);
  } catch (const UsageError&) {
    // The servers do not fit this round's world (an elastic job shrank): the trainer reports it as a
    // ConfigError naming /parallel/servers; the roles stay "default".
    return c;
  }
}

std::vector<std::string> workerEnvironment(const WorkerContext& ctx) {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv(*e);
    auto eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  const WorkerContract contract = workerContract(ctx);
  for (auto& [k, v] : contract.toEnv()) env[k] = v;
  if (contract.wantsOneOmpThread() && env.find(WorkerContract::kOmpNumThreads) == env.end())
    env[WorkerContract::kOmpNumThreads] = "1";
  if (auto host = env.find("DTRAIN_COMM_HOST"); !ctx.localAddr.empty() && (host == env.end() || host->second.empty()))
    env["DTRAIN_COMM_HOST"] = ctx.localAddr;
  std::vector<std::string> out;
  out.reserve(env.size());
  for (auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

std::string agreedEnvironment() {
  std::string text;
  for (const char* name : kAgreedVariables) {
    std::string value = env::getOr(name, "");
    if (value.empty()) {
      value = "(unset)";
    } else if (std::string_view(name) == "DTRAIN_COMPRESSION_HOST_STAGING") {
      try {
        value = env::getBool(name, false) ? "true" : "false";
      } catch (const std::exception&) {  // not a boolean: compared as written (the trainer refuses it anyway)
      }
    } else if (auto bytes = parse::toBytes(value)) {
      // The tcp sizes as the backend reads them (env::getBytes): 64K and 65536 pick the same collectives, and a
      // node that spelled the other one was refused (exit 4). Not a size: compared as written (the workers refuse it).
      value = std::to_string(*bytes);
    }
    text += fmt::format("{}={}\n", name, value);
  }
  return text;
}

}  // namespace dtrain::launch
