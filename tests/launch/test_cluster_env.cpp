// Cluster detection besides Slurm (lib/launch/cluster_env.h) as a pure function of environment maps. The MPI
// maps are what OpenMPI 4.1 (Debian's mpirun -np 2) set in each task on one host; the Kubernetes maps follow
// the Kubeflow training operator's PyTorchJob contract (per-pod MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, and
// the PET_* torchrun variables of its newer versions).
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>

#include "lib/common/error.h"
#include "lib/launch/cluster_env.h"

using dtrain::UsageError;
using namespace dtrain::launch;

namespace {

Environment openMpiTask(int rank, int size, int localSize) {
  return {{"OMPI_COMM_WORLD_RANK", std::to_string(rank)},
          {"OMPI_COMM_WORLD_SIZE", std::to_string(size)},
          {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(localSize == size ? rank : 0)},
          {"OMPI_COMM_WORLD_LOCAL_SIZE", std::to_string(localSize)},
          {"OMPI_COMM_WORLD_NODE_RANK", std::to_string(localSize == size ? rank : 0)},
          {"OMPI_MCA_ess_base_jobid", "2026897409"},
          {"OMPI_MCA_ess_base_vpid", std::to_string(rank)},
          {"PMIX_NAMESPACE", "2026897409"},
          {"PMIX_RANK", std::to_string(rank)}};
}

Environment pytorchJobPod(int rank, int pods) {
  return {{"KUBERNETES_SERVICE_HOST", "10.96.0.1"},
          {"MASTER_ADDR", "mnist-master-0"},
          {"MASTER_PORT", "23456"},
          {"WORLD_SIZE", std::to_string(pods)},
          {"RANK", std::to_string(rank)},
          {"HOSTNAME", rank == 0 ? "mnist-master-0" : "mnist-worker-" + std::to_string(rank - 1)}};
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

TEST_CASE("outside any launcher nothing is detected and nothing changes") {
  auto p = detectCluster({{"HOME", "/root"}});
  CHECK_FALSE(p.detected());
  LaunchOptions o;
  CHECK(applyCluster(p, {}, o).empty());
  CHECK(o.nnodesText == "1");
  CHECK(o.nodeRank == -1);
}

TEST_CASE("mpirun -np 2 on one host: every task is an agent, rank 0 hosts the store on loopback") {
  for (int rank : {0, 1}) {
    auto p = detectCluster(openMpiTask(rank, 2, 2));
    REQUIRE(p.kind == "mpi");
    CHECK(*p.nnodes.value == 2);
    CHECK(p.nnodes.from == "OMPI_COMM_WORLD_SIZE");
    CHECK(*p.nodeRank.value == rank);
    CHECK(p.nodeRank.from == "OMPI_COMM_WORLD_RANK");
    CHECK(*p.runId.value == "mpi-2026897409");
    REQUIRE(p.rdzvEndpoint.has());
    CHECK(p.rdzvEndpoint.value->rfind("127.0.0.1:", 0) == 0);
    LaunchOptions o;
    auto lines = applyCluster(p, {}, o);
    CHECK(o.nnodesText == "2");
    CHECK(o.nodeRank == rank);
    CHECK(o.rdzvId == "mpi-2026897409");
    CHECK(o.rdzvEndpoint == *p.rdzvEndpoint.value);
    CHECK(describe(p).find("node_rank=" + std::to_string(rank) + " (OMPI_COMM_WORLD_RANK)") != std::string::npos);
  }
  // Both tasks derive the same endpoint and run id: they meet.
  CHECK(*detectCluster(openMpiTask(0, 2, 2)).rdzvEndpoint.value == *detectCluster(openMpiTask(1, 2, 2)).rdzvEndpoint.value);
}

TEST_CASE("mpirun over several hosts: MASTER_ADDR names task 0's host, else the user is told") {
  auto env = openMpiTask(3, 4, 1);
  auto p = detectCluster(env);
  CHECK_FALSE(p.rdzvEndpoint.has());
  REQUIRE_FALSE(p.notes.empty());
  CHECK(p.notes.front().find("MASTER_ADDR") != std::string::npos);
  env["MASTER_ADDR"] = "gpu01";
  env["MASTER_PORT"] = "29501";
  p = detectCluster(env);
  CHECK(*p.rdzvEndpoint.value == "gpu01:29501");
}

TEST_CASE("MPICH/Hydra PMI_RANK and PMI_SIZE") {
  auto p = detectCluster({{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MPI_LOCALNRANKS", "2"}, {"PMI_JOBID", "77"}});
  REQUIRE(p.kind == "mpi");
  CHECK(*p.nnodes.value == 2);
  CHECK(p.nnodes.from == "PMI_SIZE");
  CHECK(*p.nodeRank.value == 1);
  CHECK(*p.runId.value == "mpi-77");
  CHECK(p.rdzvEndpoint.has());
}

TEST_CASE("PMIx rank without a size asks for --nnodes") {
  auto p = detectCluster({{"PMIX_RANK", "0"}, {"PMIX_NAMESPACE", "prterun-h-1@1"}});
  REQUIRE(p.kind == "mpi");
  CHECK_FALSE(p.nnodes.has());
  REQUIRE_FALSE(p.notes.empty());
  CHECK(p.notes.front().find("--nnodes") != std::string::npos);
}

TEST_CASE("explicit flags that contradict the launcher are named; agreeing ones are kept") {
  auto p = detectCluster(openMpiTask(1, 2, 2));
  LaunchOptions o;
  o.nodeRank = 0;
  GivenOptions given;
  given.nodeRank = true;
  auto msg = usageErrorOf([&] { applyCluster(p, given, o); });
  CHECK(msg.find("--node-rank 0 contradicts the MPI launch: OMPI_COMM_WORLD_RANK=1") != std::string::npos);
  LaunchOptions o2;
  o2.nnodesText = "4";
  GivenOptions g2;
  g2.nnodes = true;
  msg = usageErrorOf([&] { applyCluster(p, g2, o2); });
  CHECK(msg.find("--nnodes 4 contradicts the MPI launch: OMPI_COMM_WORLD_SIZE=2") != std::string::npos);
  LaunchOptions o3;
  o3.nodeRank = 1;
  o3.rdzvEndpoint = "10.0.0.1:1234";
  GivenOptions g3;
  g3.nodeRank = g3.rdzvEndpoint = true;
  auto lines = applyCluster(p, g3, o3);
  CHECK(o3.rdzvEndpoint == "10.0.0.1:1234");
  CHECK(std::find(lines.begin(), lines.end(), "node_rank=1 (--node-rank)") != lines.end());
}

TEST_CASE("malformed launcher values are usage errors naming the variable") {
  auto env = openMpiTask(0, 2, 2);
  env["OMPI_COMM_WORLD_SIZE"] = "two";
  CHECK(usageErrorOf([&] { detectCluster(env); }).find("OMPI_COMM_WORLD_SIZE=two") != std::string::npos);
  env = openMpiTask(0, 2, 2);
  env["OMPI_COMM_WORLD_RANK"] = "5";
  CHECK(usageErrorOf([&] { detectCluster(env); }).find("OMPI_COMM_WORLD_RANK=5 is not below") != std::string::npos);
}

TEST_CASE("PyTorchJob: WORLD_SIZE and RANK count pods, MASTER_ADDR:MASTER_PORT is the endpoint") {
  for (int rank : {0, 1, 2}) {
    auto p = detectCluster(pytorchJobPod(rank, 3));
    REQUIRE(p.kind == "kubernetes");
    CHECK(*p.nnodes.value == 3);
    CHECK(*p.nodeRank.value == rank);
    CHECK(*p.rdzvEndpoint.value == "mnist-master-0:23456");
    LaunchOptions o;
    applyCluster(p, {}, o);
    CHECK(o.nnodesText == "3");
    CHECK(o.nodeRank == rank);
    CHECK(o.rdzvEndpoint == "mnist-master-0:23456");
    CHECK(o.rdzvId == "k8s-mnist-master-0");
  }
}

TEST_CASE("training operator PET_* variables win, and give nproc-per-node") {
  auto env = pytorchJobPod(1, 2);
  env["PET_NNODES"] = "2";
  env["PET_NODE_RANK"] = "1";
  env["PET_NPROC_PER_NODE"] = "4";
  env["PET_MASTER_ADDR"] = "job-master-0";
  env["PET_MASTER_PORT"] = "29400";
  env["WORLD_SIZE"] = "8";  // workers in torchrun terms: not node counts
  auto p = detectCluster(env);
  CHECK(*p.nnodes.value == 2);
  CHECK(p.nnodes.from == "PET_NNODES");
  CHECK(*p.nproc.value == 4);
  CHECK(*p.rdzvEndpoint.value == "job-master-0:29400");
  LaunchOptions o;
  applyCluster(p, {}, o);
  CHECK(o.nprocText == "4");
}

TEST_CASE("Indexed Job behind a headless service: DTRAIN_HOSTS and the pod's index or hostname") {
  Environment env{{"KUBERNETES_SERVICE_HOST", "10.96.0.1"},
                  {"DTRAIN_HOSTS", "train-0.train.ns.svc,train-1.train.ns.svc,train-2.train.ns.svc"},
                  {"HOSTNAME", "train-2"}};
  auto p = detectCluster(env);
  CHECK(*p.nnodes.value == 3);
  CHECK(*p.nodeRank.value == 2);
  CHECK(*p.rdzvEndpoint.value == "train-0.train.ns.svc:29400");
  env["JOB_COMPLETION_INDEX"] = "1";
  CHECK(*detectCluster(env).nodeRank.value == 1);
}

TEST_CASE("DTRAIN_CLUSTER turns detection off or forces a kind") {
  auto env = openMpiTask(0, 2, 2);
  env["DTRAIN_CLUSTER"] = "none";
  CHECK_FALSE(detectCluster(env).detected());
  Environment k{{"WORLD_SIZE", "2"}, {"RANK", "0"}, {"MASTER_ADDR", "m"}, {"DTRAIN_CLUSTER", "kubernetes"}};
  CHECK(detectCluster(k).kind == "kubernetes");
  k["DTRAIN_CLUSTER"] = "yes";
  CHECK(usageErrorOf([&] { detectCluster(k); }).find("DTRAIN_CLUSTER=yes") != std::string::npos);
}
