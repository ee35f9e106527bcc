// Slurm detection as a pure function of environment maps. The maps are trimmed copies of what Slurm 22.05 set
// in real steps of the local test cluster (scripts/slurm/local-cluster), one per situation.
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>

#include "lib/common/error.h"
#include "lib/launch/slurm.h"

using dtrain::UsageError;
using namespace dtrain::launch;

namespace {

// `srun -N2 --ntasks-per-node=1` inside `sbatch -N2`, as node `nodeId` sees it (no GPUs requested).
Environment twoNodeStep(int nodeId) {
  return {{"SLURM_JOB_ID", "1234"},          {"SLURM_JOBID", "1234"},
          {"SLURM_STEP_ID", "0"},            {"SLURM_STEPID", "0"},
          {"SLURM_NNODES", "2"},             {"SLURM_JOB_NUM_NODES", "2"},
          {"SLURM_STEP_NUM_NODES", "2"},     {"SLURM_NODEID", std::to_string(nodeId)},
          {"SLURM_LOCALID", "0"},            {"SLURM_PROCID", std::to_string(nodeId)},
          {"SLURM_STEP_NODELIST", "node[1-2]"}, {"SLURM_JOB_NODELIST", "node[1-2]"},
          {"SLURM_NODELIST", "node[1-2]"},   {"SLURM_TASKS_PER_NODE", "1(x2)"},
          {"SLURM_STEP_TASKS_PER_NODE", "1(x2)"}, {"SLURM_NTASKS", "2"},
          {"SLURM_STEP_NUM_TASKS", "2"},     {"SLURM_CPUS_ON_NODE", "4"},
          {"SLURM_JOB_CPUS_PER_NODE", "4(x2)"}, {"SLURMD_NODENAME", nodeId == 0 ? "node1" : "node2"}};
}

std::string usageErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const UsageError& e) {
    return e.what();
  }
  FAIL("expected a UsageError");
  return {};
}

}  // namespace

TEST_CASE("outside Slurm nothing is detected and nothing changes") {
  auto plan = detectSlurm({{"HOME", "/root"}, {"CUDA_VISIBLE_DEVICES", "0,1"}});
  CHECK_FALSE(plan.inSlurm);
  CHECK_FALSE(plan.nnodes.has());
  CHECK_FALSE(plan.nproc.has());
  CHECK(describe(plan) == "slurm: not in a Slurm job (no SLURM_JOB_ID)\n");
  LaunchOptions o;
  o.nnodesText = "3";
  o.nprocText = "auto";
  CHECK(applySlurm(plan, GivenOptions{}, o).empty());
  CHECK(o.nnodesText == "3");
  CHECK(o.nprocText == "auto");
  CHECK(o.rdzvId == "none");
  CHECK(o.rdzvEndpoint.empty());
}

TEST_CASE("DTRAIN_SLURM=0 turns detection off") {
  auto env = twoNodeStep(1);
  env["DTRAIN_SLURM"] = "0";
  auto plan = detectSlurm(env);
  CHECK_FALSE(plan.inSlurm);
  CHECK(plan.status.find("DTRAIN_SLURM=0") != std::string::npos);
  env["DTRAIN_SLURM"] = "maybe";
  CHECK(usageErrorOf([&] { detectSlurm(env); }).find("DTRAIN_SLURM=maybe") != std::string::npos);
  env["DTRAIN_SLURM"] = "1";
  CHECK(detectSlurm(env).inSlurm);
}

TEST_CASE("two-node step: every value and its source") {
  auto plan = detectSlurm(twoNodeStep(1));
  CHECK(plan.inSlurm);
  CHECK(plan.inStep);
  CHECK(*plan.nnodes.value == 2);
  CHECK(plan.nnodes.from == "SLURM_STEP_NUM_NODES");
  CHECK(*plan.nodeRank.value == 1);
  CHECK(plan.nodeRank.from == "SLURM_NODEID");
  CHECK(*plan.runId.value == "1234.0");
  CHECK(*plan.storeHost.value == "node1");
  // port 29400 + (10 * 1234 + 0) % 1000
  CHECK(*plan.rdzvEndpoint.value == "node1:29740");
  CHECK(plan.rdzvEndpoint.from.find("SLURM_STEP_NODELIST=node[1-2]") != std::string::npos);
  CHECK_FALSE(plan.gpus.has());
  CHECK(*plan.cpus.value == 4);
  CHECK(*plan.nproc.value == 4);  // no GPU, one task per node: the CPUs
  CHECK(plan.nproc.from == "CPUs: SLURM_CPUS_ON_NODE");
  CHECK(*plan.tasksOnNode.value == 1);
  CHECK_FALSE(plan.extraTask());

  auto text = describe(plan);
  CHECK(text.find("nnodes=2 (SLURM_STEP_NUM_NODES)\n") != std::string::npos);
  CHECK(text.find("node_rank=1 (SLURM_NODEID)\n") != std::string::npos);
  CHECK(text.find("rdzv_id=1234.0 (SLURM_JOB_ID, SLURM_STEP_ID)\n") != std::string::npos);

  LaunchOptions o;
  auto lines = applySlurm(plan, GivenOptions{}, o);
  CHECK(o.nnodesText == "2");
  CHECK(o.nodeRank == 1);
  CHECK(o.rdzvId == "1234.0");
  CHECK(o.rdzvEndpoint == "node1:29740");
  CHECK(o.nprocText == "4");
  REQUIRE(lines.size() >= 5);
  CHECK(lines[1] == "nnodes=2 (SLURM_STEP_NUM_NODES)");
  CHECK(lines[2] == "node_rank=1 (SLURM_NODEID)");
}

TEST_CASE("a step on fewer nodes than its job uses the step's nodes") {
  // `srun -N1 -w node2` inside a 2-node job: the step's node list, not the job's, names the store host.
  auto env = twoNodeStep(0);
  env["SLURM_NNODES"] = "1";
  env["SLURM_STEP_NUM_NODES"] = "1";
  env["SLURM_STEP_NODELIST"] = "node2";
  env["SLURM_STEP_TASKS_PER_NODE"] = "1";
  env["SLURM_TASKS_PER_NODE"] = "1";
  env["SLURM_STEP_NUM_TASKS"] = "1";
  env["SLURM_STEP_ID"] = env["SLURM_STEPID"] = "3";
  auto plan = detectSlurm(env);
  CHECK(*plan.nnodes.value == 1);
  CHECK(*plan.storeHost.value == "node2");
  CHECK(*plan.rdzvEndpoint.value == "127.0.0.1:29743");  // one node: loopback
  CHECK(*plan.runId.value == "1234.3");
}

TEST_CASE("GPUs decide nproc, capped by what the task can see") {
  auto env = twoNodeStep(0);
  env["SLURM_GPUS_ON_NODE"] = "2";
  env["CUDA_VISIBLE_DEVICES"] = "0,1";
  env["SLURM_STEP_GPUS"] = "0,1";
  auto plan = detectSlurm(env);
  CHECK(*plan.gpus.value == 2);
  CHECK(plan.gpus.from == "SLURM_GPUS_ON_NODE");
  CHECK(*plan.nproc.value == 2);
  CHECK(plan.nproc.from == "GPUs: SLURM_GPUS_ON_NODE");

  env["CUDA_VISIBLE_DEVICES"] = "1";
  plan = detectSlurm(env);
  CHECK(*plan.gpus.value == 1);
  CHECK(plan.gpus.from.find("CUDA_VISIBLE_DEVICES") == 0);

  env.erase("SLURM_GPUS_ON_NODE");
  env.erase("CUDA_VISIBLE_DEVICES");
  env["SLURM_STEP_GPUS"] = "0-3,6";
  plan = detectSlurm(env);
  CHECK(*plan.gpus.value == 5);
  CHECK(*plan.nproc.value == 5);

  env.erase("SLURM_STEP_GPUS");
  env["CUDA_VISIBLE_DEVICES"] = "GPU-aaaa,GPU-bbbb,GPU-cccc";
  CHECK(*detectSlurm(env).nproc.value == 3);
  env["CUDA_VISIBLE_DEVICES"] = "NoDevFiles";
  plan = detectSlurm(env);
  CHECK(*plan.gpus.value == 0);
  CHECK(plan.nproc.from == "CPUs: SLURM_CPUS_ON_NODE");

  env["SLURM_CPUS_PER_TASK"] = "3";
  CHECK(*detectSlurm(env).nproc.value == 3);
}

TEST_CASE("several tasks per node: the first runs the agent, the others step aside") {
  // `srun -n 4` over 2 nodes (2 tasks per node) without GPUs, seen by the second task on node2.
  auto env = twoNodeStep(1);
  env["SLURM_LOCALID"] = "1";
  env["SLURM_PROCID"] = "3";
  env["SLURM_TASKS_PER_NODE"] = env["SLURM_STEP_TASKS_PER_NODE"] = "2(x2)";
  env["SLURM_NTASKS"] = env["SLURM_STEP_NUM_TASKS"] = "4";
  auto plan = detectSlurm(env);
  CHECK(*plan.tasksOnNode.value == 2);
  CHECK(plan.extraTask());
  auto note = plan.extraTaskNote();
  CHECK(note.find("srun started 2 tasks on node node2") != std::string::npos);
  CHECK(note.find("SLURM_LOCALID=1 exits") != std::string::npos);
  CHECK(note.find("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 dtrain run") != std::string::npos);

  env["SLURM_LOCALID"] = "0";
  plan = detectSlurm(env);
  CHECK_FALSE(plan.extraTask());
  CHECK(*plan.nproc.value == 2);  // one worker per task the user asked for on this node
  CHECK(plan.nproc.from.find("SLURM_STEP_NUM_TASKS=4 tasks on 2 nodes") == 0);

  // Uneven: 3 tasks on 2 nodes is "2,1"; the node with one task still runs one worker.
  env["SLURM_STEP_TASKS_PER_NODE"] = "2,1";
  env["SLURM_STEP_NUM_TASKS"] = "3";
  CHECK(*detectSlurm(env).nproc.value == 1);
  env["SLURM_NODEID"] = "0";
  CHECK(*detectSlurm(env).nproc.value == 2);
}

TEST_CASE("batch script of a one-node job is derived like a step") {
  Environment env{{"SLURM_JOB_ID", "77"},        {"SLURM_JOB_NUM_NODES", "1"},  {"SLURM_NNODES", "1"},
                  {"SLURM_NODEID", "0"},         {"SLURM_LOCALID", "0"},        {"SLURM_JOB_NODELIST", "node1"},
                  {"SLURM_TASKS_PER_NODE", "4"}, {"SLURM_NTASKS", "4"},         {"SLURM_CPUS_ON_NODE", "4"},
                  {"SLURM_RESTART_COUNT", "2"}};
  auto plan = detectSlurm(env);
  CHECK(plan.inSlurm);
  CHECK_FALSE(plan.inStep);
  CHECK(*plan.nnodes.value == 1);
  CHECK(plan.nnodes.from == "SLURM_JOB_NUM_NODES");
  CHECK(*plan.runId.value == "77.batch-requeue2");
  CHECK(plan.runId.from.find("SLURM_RESTART_COUNT") != std::string::npos);
  CHECK(*plan.rdzvEndpoint.value == "127.0.0.1:30170");  // 29400 + 770
  CHECK(*plan.nproc.value == 4);
  CHECK(plan.notes.empty());
}

TEST_CASE("batch script of a multi-node job uses this node only and says how to use all") {
  Environment env{{"SLURM_JOB_ID", "78"},           {"SLURM_JOB_NUM_NODES", "2"}, {"SLURM_NNODES", "2"},
                  {"SLURM_NODEID", "0"},            {"SLURM_LOCALID", "0"},       {"SLURM_JOB_NODELIST", "node[1-2]"},
                  {"SLURM_TASKS_PER_NODE", "1(x2)"}, {"SLURM_CPUS_ON_NODE", "2"}};
  auto plan = detectSlurm(env);
  CHECK(plan.inSlurm);
  CHECK_FALSE(plan.nnodes.has());
  CHECK_FALSE(plan.nodeRank.has());
  CHECK_FALSE(plan.rdzvEndpoint.has());
  REQUIRE(plan.notes.size() == 1);
  CHECK(plan.notes[0].find("srun --nodes=2 --ntasks=2 --ntasks-per-node=1") != std::string::npos);
  LaunchOptions o;
  auto lines = applySlurm(plan, GivenOptions{}, o);
  CHECK(o.nnodesText == "1");
  CHECK(o.nodeRank == -1);
  CHECK(o.nprocText == "2");
  CHECK(lines.back().find("note: ") == 0);
}

TEST_CASE("explicit flags win unless they contradict the allocation") {
  auto plan = detectSlurm(twoNodeStep(1));
  {
    LaunchOptions o;
    o.nnodesText = "4";
    auto e = usageErrorOf([&] { applySlurm(plan, GivenOptions{.nnodes = true}, o); });
    CHECK(e.find("--nnodes 4 contradicts the Slurm allocation: SLURM_STEP_NUM_NODES=2") == 0);
  }
  {
    LaunchOptions o;
    o.nnodesText = "1:4";  // an elastic range that holds the allocation is fine
    applySlurm(plan, GivenOptions{.nnodes = true}, o);
    CHECK(o.nnodesText == "1:4");
  }
  {
    LaunchOptions o;
    o.nodeRank = 0;
    auto e = usageErrorOf([&] { applySlurm(plan, GivenOptions{.nodeRank = true}, o); });
    CHECK(e.find("--node-rank 0 contradicts the Slurm step: SLURM_NODEID=1") == 0);
  }
  {
    LaunchOptions o;
    o.standalone = true;
    CHECK(usageErrorOf([&] { applySlurm(plan, GivenOptions{}, o); }).find("--standalone runs a single node") == 0);
  }
  {
    LaunchOptions o;
    o.rdzvEndpoint = "store.example:1234";
    o.rdzvId = "mine";
    o.nprocText = "3";
    auto lines = applySlurm(plan, GivenOptions{.nproc = true, .rdzvEndpoint = true, .rdzvId = true}, o);
    CHECK(o.rdzvEndpoint == "store.example:1234");
    CHECK(o.rdzvId == "mine");
    CHECK(o.nprocText == "3");
    CHECK(o.nodeRank == 1);
    CHECK(std::find(lines.begin(), lines.end(), "nproc_per_node=3 (--nproc-per-node)") != lines.end());
  }
  {
    LaunchOptions o;  // a standalone `dtrain store`: its endpoint is the user's to give, never derived
    o.rdzvBackend = "store";
    applySlurm(plan, GivenOptions{}, o);
    CHECK(o.rdzvEndpoint.empty());
  }
  {
    LaunchOptions o;  // etcd runs where the user says too: Slurm's head node is not an etcd endpoint
    o.rdzvBackend = "etcd";
    applySlurm(plan, GivenOptions{}, o);
    CHECK(o.rdzvEndpoint.empty());
  }
}

TEST_CASE("explicit auto, gpu and cpu resolve through Slurm's counts") {
  auto env = twoNodeStep(0);
  env["SLURM_GPUS_ON_NODE"] = "2";
  auto plan = detectSlurm(env);
  LaunchOptions o;
  o.nprocText = "cpu";
  applySlurm(plan, GivenOptions{.nproc = true}, o);
  CHECK(o.nprocText == "4");
  o.nprocText = "gpu";
  applySlurm(plan, GivenOptions{.nproc = true}, o);
  CHECK(o.nprocText == "2");
  o.nprocText = "auto";
  applySlurm(plan, GivenOptions{.nproc = true}, o);
  CHECK(o.nprocText == "2");

  env["SLURM_GPUS_ON_NODE"] = "0";
  o.nprocText = "gpu";
  auto e = usageErrorOf([&] { applySlurm(detectSlurm(env), GivenOptions{.nproc = true}, o); });
  CHECK(e.find("Slurm gave this task no GPU (SLURM_GPUS_ON_NODE)") != std::string::npos);
}

TEST_CASE("malformed Slurm variables are UsageErrors naming the variable") {
  auto env = twoNodeStep(0);
  env["SLURM_STEP_NUM_NODES"] = "two";
  CHECK(usageErrorOf([&] { detectSlurm(env); }).find("environment variable SLURM_STEP_NUM_NODES=two") == 0);
  env = twoNodeStep(0);
  env["SLURM_NODEID"] = "5";
  CHECK(usageErrorOf([&] { detectSlurm(env); }).find("SLURM_NODEID=5 is out of range for SLURM_STEP_NUM_NODES=2") ==
        std::string("environment variable ").size());
  env = twoNodeStep(0);
  env["SLURM_STEP_NODELIST"] = "node[1-2";
  CHECK(usageErrorOf([&] { detectSlurm(env); }).find("bad Slurm host list 'node[1-2'") == 0);
  env = twoNodeStep(1);
  env["SLURM_STEP_TASKS_PER_NODE"] = "1";
  CHECK(usageErrorOf([&] { detectSlurm(env); }).find("has no entry for node 1") != std::string::npos);
}

TEST_CASE("processEnvironment reads this process's environment") {
  ::setenv("DTRAIN_TEST_SLURM_PROBE", "a=b", 1);
  auto env = processEnvironment();
  CHECK(env.at("DTRAIN_TEST_SLURM_PROBE") == "a=b");
  ::unsetenv("DTRAIN_TEST_SLURM_PROBE");
}
