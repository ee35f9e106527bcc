#include <doctest/doctest.h>

#include <map>

#include "lib/common/error.h"
#include "lib/common/worker_contract.h"

using namespace dtrain;

namespace {

using Env = std::map<std::string, std::string>;

WorkerContract fromMap(const Env& env) {
  return WorkerContract::fromEnv([&](const char* name) -> std::optional<std::string> {
    auto it = env.find(name);
    if (it == env.end()) return std::nullopt;
    return it->second;
  });
}

std::string usageErrorOf(const Env& env) {
  try {
    fromMap(env);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(no UsageError)";
}

}  // namespace

TEST_CASE("nothing set: a one-process job") {
  auto c = fromMap({});
  CHECK(c == WorkerContract{});
  CHECK(c.rank == 0);
  CHECK(c.worldSize == 1);
  CHECK(c.localRank == 0);
  CHECK(c.localWorldSize == 1);
  CHECK(c.nodeRank == 0);
  CHECK(c.numNodes == 1);
  CHECK(c.store.empty());
  CHECK(c.runId == "none");
  CHECK(c.restartCount == 0);
  CHECK_FALSE(c.wantsOneOmpThread());
}

TEST_CASE("only RANK and WORLD_SIZE: one node, as torchrun --standalone sets it") {
  auto c = fromMap({{"RANK", "3"}, {"WORLD_SIZE", "4"}});
  CHECK(c.localRank == 3);
  CHECK(c.localWorldSize == 4);
  CHECK(c.roleRank == 3);
  CHECK(c.roleWorldSize == 4);
  CHECK(c.nodeRank == 0);
  CHECK(c.wantsOneOmpThread());
}

TEST_CASE("toEnv and fromEnv round-trip every field") {
  WorkerContract c;
  c.rank = 5;
  c.worldSize = 8;
  c.localRank = 1;
  c.localWorldSize = 4;
  c.nodeRank = 1;
  c.numNodes = 2;
  c.roleRank = 5;
  c.roleWorldSize = 8;
  c.roleName = "default";
  c.masterAddr = "node0";
  c.masterPort = 29501;
  c.store = "node0:29400";
  c.runId = "job-7";
  c.round = 3;
  c.restartCount = 2;
  c.maxRestarts = 4;
  auto vars = c.toEnv();
  Env env(vars.begin(), vars.end());
  CHECK(env.size() == vars.size());  // no name twice
  CHECK(fromMap(env) == c);
  // torchrun's names, dtrain's and torchelastic's aliases.
  CHECK(env["GROUP_RANK"] == "1");
  CHECK(env["GROUP_WORLD_SIZE"] == "2");
  CHECK(env["DTRAIN_STORE"] == "node0:29400");
  CHECK(env["TORCHELASTIC_RUN_ID"] == "job-7");
  CHECK(env["TORCHELASTIC_RESTART_COUNT"] == "2");
  CHECK(env["TORCHELASTIC_MAX_RESTARTS"] == "4");
  CHECK(vars.front().first == "RANK");
}

TEST_CASE("the torchelastic aliases stand in for missing DTRAIN_ names") {
  auto c = fromMap({{"TORCHELASTIC_RUN_ID", "te"}, {"TORCHELASTIC_RESTART_COUNT", "2"},
                    {"TORCHELASTIC_MAX_RESTARTS", "3"}});
  CHECK(c.runId == "te");
  CHECK(c.restartCount == 2);
  CHECK(c.maxRestarts == 3);
  auto d = fromMap({{"DTRAIN_RUN_ID", "mine"}, {"TORCHELASTIC_RUN_ID", "te"}, {"DTRAIN_RESTART_COUNT", "1"},
                    {"TORCHELASTIC_RESTART_COUNT", "2"}});
  CHECK(d.runId == "mine");
  CHECK(d.restartCount == 1);
}

TEST_CASE("an empty value counts as unset") {
  auto c = fromMap({{"RANK", ""}, {"WORLD_SIZE", ""}, {"DTRAIN_RUN_ID", ""}});
  CHECK(c == WorkerContract{});
}

TEST_CASE("malformed values are UsageErrors naming the variable") {
  CHECK(usageErrorOf({{"RANK", "x"}}) == "environment variable RANK=x: expected an integer");
  CHECK(usageErrorOf({{"LOCAL_RANK", "1.5"}}) == "environment variable LOCAL_RANK=1.5: expected an integer");
  CHECK(usageErrorOf({{"WORLD_SIZE", "99999999999"}}) ==
        "environment variable WORLD_SIZE=99999999999: expected an integer");
  CHECK(usageErrorOf({{"RANK", "2"}, {"WORLD_SIZE", "2"}}) == "RANK=2 WORLD_SIZE=2: expected 0 <= RANK < WORLD_SIZE");
  CHECK(usageErrorOf({{"RANK", "-1"}}) == "RANK=-1 WORLD_SIZE=1: expected 0 <= RANK < WORLD_SIZE");
  CHECK(usageErrorOf({{"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}) ==
        "LOCAL_RANK=2 LOCAL_WORLD_SIZE=2: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE");
  CHECK(usageErrorOf({{"MASTER_PORT", "70000"}}) ==
        "environment variable MASTER_PORT=70000: expected a port number (0-65535)");
  CHECK(usageErrorOf({{"DTRAIN_RESTART_COUNT", "two"}}) ==
        "environment variable DTRAIN_RESTART_COUNT=two: expected an integer");
}
